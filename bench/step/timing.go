package step

import (
	"slices"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
)

// timeSteps runs warmup + iters steps and returns the median device and wall times.
func (b *bench) timeSteps(bt *kernels.Batch, lastRows []int, warmup, iters int) (float64, float64, error) {
	return b.timeRuns(warmup, iters, func() ([]*model.Forward, error) {
		f, err := b.step(bt, lastRows)
		return []*model.Forward{f}, err
	})
}

// timeRuns calls run warmup + iters times between the device timer's start
// and stop, releasing the forwards each call returns (nil ones too) after
// the device is idle, and returns the median device and wall times of the
// last iters calls.
func (b *bench) timeRuns(warmup, iters int, run func() ([]*model.Forward, error)) (float64, float64, error) {
	tm, err := b.be.NewTimer()
	if err != nil {
		return 0, 0, err
	}
	defer tm.Close()
	var dev, wall []float64
	for i := 0; i < warmup+iters; i++ {
		t0 := time.Now()
		if err := tm.Start(); err != nil {
			return 0, 0, err
		}
		fs, err := run()
		if err == nil {
			err = tm.Stop()
		}
		var s float64
		if err == nil {
			s, err = tm.Seconds()
		}
		if err == nil {
			err = b.be.Sync()
		}
		for _, f := range fs {
			if f != nil {
				f.Release()
			}
		}
		if err != nil {
			return 0, 0, err
		}
		if i >= warmup {
			dev = append(dev, s)
			wall = append(wall, time.Since(t0).Seconds())
		}
	}
	return median(dev), median(wall), nil
}

func median(v []float64) float64 {
	s := slices.Sorted(slices.Values(v))
	return s[len(s)/2]
}

package cuda

import (
	"fmt"
	"sort"

	"github.com/glmtopo/glmtopo/kernels"
)

// Timer measures device time between two points of the stream (CUDA events).
type Timer struct {
	b          *Backend
	start, end uintptr
}

// NewTimer makes a pair of events.
func (b *Backend) NewTimer() (*Timer, error) {
	t := &Timer{b: b}
	err := b.op(func() error {
		if err := b.d.check(b.d.cuEventCreate(&t.start, 0), "cuEventCreate"); err != nil {
			return err
		}
		return b.d.check(b.d.cuEventCreate(&t.end, 0), "cuEventCreate")
	})
	return t, err
}

// Start records the start event; Stop the end event.
func (t *Timer) Start() error { return t.record(t.start) }
func (t *Timer) Stop() error  { return t.record(t.end) }

func (t *Timer) record(ev uintptr) error {
	return t.b.op(func() error {
		r, _, _ := syscallN(t.b.d.eventRecord, ev, t.b.stream)
		return t.b.d.check(int32(r), "cuEventRecord")
	})
}

// Seconds waits for the end event and returns the time between the events.
func (t *Timer) Seconds() (float64, error) {
	var ms float32
	err := t.b.op(func() error {
		if err := t.b.d.check(t.b.d.cuEventSynchronize(t.end), "cuEventSynchronize"); err != nil {
			return err
		}
		return t.b.d.check(t.b.d.cuEventElapsedTime(&ms, t.start, t.end), "cuEventElapsedTime")
	})
	return float64(ms) / 1e3, err
}

// Median runs fn between the timer's events warmup+iters times and returns
// the median device time of the last iters, in seconds.
func (t *Timer) Median(warmup, iters int, fn func() error) (float64, error) {
	var times []float64
	for i := range warmup + iters {
		if err := t.Start(); err != nil {
			return 0, err
		}
		if err := fn(); err != nil {
			return 0, err
		}
		if err := t.Stop(); err != nil {
			return 0, err
		}
		s, err := t.Seconds()
		if err != nil {
			return 0, err
		}
		if i >= warmup {
			times = append(times, s)
		}
	}
	return median(times), nil
}

// Close destroys the events.
func (t *Timer) Close() {
	t.b.op(func() error {
		t.b.d.cuEventDestroy(t.start)
		t.b.d.cuEventDestroy(t.end)
		return nil
	})
}

// Fill writes deterministic pseudo-random values uniform in [-scale, scale)
// into an F32 or BF16 tensor, or random e4m3 bytes (never NaN, |v| ≤ 120)
// into an F8E4M3 one: synthetic ("dummy") weights made on the device.
func (b *Backend) Fill(t *kernels.Tensor, seed uint64, scale float32) error {
	bf, err := devBuf(t, "fill target")
	if err != nil {
		return err
	}
	var dt int32
	switch t.DType {
	case kernels.F32:
	case kernels.BF16:
		dt = 1
	case kernels.F8E4M3:
		dt = 2
	default:
		return fmt.Errorf("cuda: fill of %v tensor", t.DType)
	}
	n := int64(t.Elements())
	return b.op(func() error {
		return b.launch("ops", "fill_random", grid1(n, 1024), b256, 0, bf.ptr, n, dt, seed, scale)
	})
}

// FillConst sets every element of an F32 tensor to v.
func (b *Backend) FillConst(t *kernels.Tensor, v float32) error {
	p, err := ptrOf(t, kernels.F32, "fill target")
	if err != nil {
		return err
	}
	n := int64(t.Elements())
	return b.op(func() error { return b.launch("ops", "fill_f32", grid1(n, 1024), b256, 0, p, n, v) })
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// ReadBandwidth measures HBM read bandwidth (bytes/s): a kernel that reads
// a buffer of the given size once per pass, median of iters passes.
func (b *Backend) ReadBandwidth(bytes int64, iters int) (float64, error) {
	t, err := b.NewTensor(kernels.BF16, int(bytes/2))
	if err != nil {
		return 0, err
	}
	defer b.Free(t)
	sink, err := b.NewTensor(kernels.I32, 1)
	if err != nil {
		return 0, err
	}
	defer b.Free(sink)
	if err := b.Fill(t, 7, 1); err != nil {
		return 0, err
	}
	tm, err := b.NewTimer()
	if err != nil {
		return 0, err
	}
	defer tm.Close()
	n := int64(t.Elements()*2) / 16
	p := t.Impl.(*buf).ptr
	sp := sink.Impl.(*buf).ptr
	sec, err := tm.Median(2, iters, func() error {
		return b.op(func() error {
			return b.launch("ops", "read_probe", [3]uint32{uint32(b.sms * 8), 1, 1}, [3]uint32{512, 1, 1}, 0, p, n, sp)
		})
	})
	if err != nil {
		return 0, err
	}
	return float64(n*16) / sec, nil
}

// GemmFLOPS measures cuBLAS bf16 GEMM throughput (FLOP/s) on random data
// at m×n×k, median of iters runs.
func (b *Backend) GemmFLOPS(m, n, k, iters int) (float64, error) {
	if b.blas == nil {
		return 0, fmt.Errorf("cuda: cuBLAS not loaded")
	}
	x, err := b.NewTensor(kernels.BF16, m, k)
	if err != nil {
		return 0, err
	}
	defer b.Free(x)
	w, err := b.NewTensor(kernels.BF16, n, k)
	if err != nil {
		return 0, err
	}
	defer b.Free(w)
	out, err := b.NewTensor(kernels.F32, m, n)
	if err != nil {
		return 0, err
	}
	defer b.Free(out)
	if err := b.Fill(x, 1, 1); err != nil {
		return 0, err
	}
	if err := b.Fill(w, 2, 1); err != nil {
		return 0, err
	}
	tm, err := b.NewTimer()
	if err != nil {
		return 0, err
	}
	defer tm.Close()
	sec, err := tm.Median(2, iters, func() error {
		return b.op(func() error {
			return b.blas.gemmBF16(out.Impl.(*buf).ptr, x.Impl.(*buf).ptr, w.Impl.(*buf).ptr, m, n, k)
		})
	})
	if err != nil {
		return 0, err
	}
	return 2 * float64(m) * float64(n) * float64(k) / sec, nil
}

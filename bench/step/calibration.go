package step

import (
	"fmt"

	"github.com/glmtopo/glmtopo/topology"
)

// engineRates is what the engine's steps achieved, not what a copy kernel
// or cuBLAS alone can: the floor bytes of the best decode step over its time,
// and the FLOPs of the best prefill step over its time (each falls back to
// the raw measurement when that phase did not run). The planner predicts
// with these, so its numbers track the engine as it is today.
func engineRates(r *Report) (bytesPerS, flopPerS float64) {
	for _, x := range r.Results {
		if x.StepSeconds <= 0 {
			continue
		}
		switch x.Phase {
		case "decode":
			bytesPerS = max(bytesPerS, float64(x.Bytes)/x.StepSeconds)
		case "prefill":
			flopPerS = max(flopPerS, x.FLOPs/x.StepSeconds)
		}
	}
	if bytesPerS == 0 {
		bytesPerS = r.ReadBW
	}
	if flopPerS == 0 {
		flopPerS = r.GemmFLOPS
	}
	return bytesPerS, flopPerS
}

// writeCalibration records rates against the GPU's datasheet figures, so the
// planner predicts with measured rather than default efficiencies.
func writeCalibration(path, device string, memBytes uint64, readBW, gemmFLOPS float64) error {
	gpu, err := topology.GPUFromDeviceName(device, memBytes)
	if err != nil {
		return fmt.Errorf("calibration: %w", err)
	}
	c, err := topology.MeasuredCalibration(gpu, readBW, gemmFLOPS)
	if err != nil {
		return err
	}
	return c.WriteFile(path)
}

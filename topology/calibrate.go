package topology

import (
	"fmt"
	"os"
	"strings"

	"go.yaml.in/yaml/v3"
)

// GPUFromDeviceName maps a driver-reported device name ("NVIDIA H100 80GB
// HBM3", "NVIDIA H200") and its memory to a catalog model name.
func GPUFromDeviceName(name string, memBytes uint64) (string, error) {
	n := strings.ToUpper(name)
	switch {
	case strings.Contains(n, "H200"):
		return "H200", nil
	case strings.Contains(n, "H100") && strings.Contains(n, "PCIE"):
		return "H100-PCIe-80G", nil
	case strings.Contains(n, "H100"):
		return "H100-SXM-80G", nil
	case strings.Contains(n, "A100") && memBytes > 0 && memBytes < 60<<30:
		return "A100-40G", nil
	case strings.Contains(n, "A100"):
		return "A100-80G", nil
	case strings.Contains(n, "L40S"):
		return "L40S", nil
	case strings.Contains(n, "B200"):
		return "B200", nil
	case strings.Contains(n, "MI300X"):
		return "MI300X", nil
	}
	if g, err := LookupGPU(name); err == nil {
		return g.Name, nil
	}
	return "", fmt.Errorf("GPU %q is not in the planner's catalog (%s)", name, strings.Join(GPUModels(), ", "))
}

// MeasuredCalibration turns measured HBM read bandwidth (bytes/s) and dense
// bf16 GEMM throughput (FLOP/s) on GPU model gpu into efficiency factors
// against the catalog's datasheet figures: what `glmtopo bench step
// --calibration-out` writes and `glmtopo plan --calibration` reads.
func MeasuredCalibration(gpu string, hbmBytesPerS, gemmFLOPPerS float64) (*Calibration, error) {
	g, err := LookupGPU(gpu)
	if err != nil {
		return nil, err
	}
	frac := func(what string, measured, peak float64) (*float64, error) {
		if measured <= 0 || peak <= 0 {
			return nil, fmt.Errorf("calibration: %s measurement %g is not positive", what, measured)
		}
		f := min(measured/peak, 1) // a datasheet rounded down can be beaten slightly
		return &f, nil
	}
	hbm, err := frac("HBM", hbmBytesPerS, g.HBMGBps*1e9)
	if err != nil {
		return nil, err
	}
	gemm, err := frac("GEMM", gemmFLOPPerS, g.BF16TFLOPS*1e12)
	if err != nil {
		return nil, err
	}
	return &Calibration{GPUs: map[string]CalibrationEntry{g.Name: {HBM: hbm, GEMM: gemm}}}, nil
}

// WriteFile writes c as YAML, merging into an existing calibration file so
// several GPU models can be measured one at a time.
func (c *Calibration) WriteFile(path string) error {
	out := &Calibration{GPUs: map[string]CalibrationEntry{}}
	if old, err := LoadCalibration(path); err == nil {
		for k, v := range old.GPUs {
			out.GPUs[k] = v
		}
	} else if !os.IsNotExist(unwrapPathError(err)) {
		return err
	}
	for k, v := range c.GPUs {
		e := out.GPUs[k]
		if v.HBM != nil {
			e.HBM = v.HBM
		}
		if v.GEMM != nil {
			e.GEMM = v.GEMM
		}
		out.GPUs[k] = e
	}
	data, err := yaml.Marshal(out)
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		return fmt.Errorf("write calibration: %w", err)
	}
	return nil
}

// unwrapPathError finds the *os.PathError inside err, for IsNotExist.
func unwrapPathError(err error) error {
	for e := err; e != nil; {
		if pe, ok := e.(*os.PathError); ok {
			return pe
		}
		u, ok := e.(interface{ Unwrap() error })
		if !ok {
			break
		}
		e = u.Unwrap()
	}
	return err
}

package topology

import (
	"path/filepath"
	"testing"
)

func TestMeasuredCalibrationRoundTrip(t *testing.T) {
	for name, want := range map[string]string{
		"NVIDIA H100 80GB HBM3": "H100-SXM-80G", "NVIDIA H100 PCIe": "H100-PCIe-80G", "NVIDIA H200": "H200",
		"NVIDIA A100-SXM4-40GB": "A100-40G", "NVIDIA L40S": "L40S",
	} {
		mem := uint64(80 << 30)
		if want == "A100-40G" {
			mem = 40 << 30
		}
		if got, err := GPUFromDeviceName(name, mem); err != nil || got != want {
			t.Errorf("%s: %q %v, want %s", name, got, err, want)
		}
	}
	if _, err := GPUFromDeviceName("NVIDIA GeForce RTX 4090", 24<<30); err == nil {
		t.Error("unknown GPU accepted")
	}
	g, _ := LookupGPU("H200")
	c, err := MeasuredCalibration("H200", 0.96*g.HBMGBps*1e9, 0.77*g.BF16TFLOPS*1e12)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "calibration.yaml")
	if err := c.WriteFile(path); err != nil {
		t.Fatal(err)
	}
	h100, _ := MeasuredCalibration("H100-80G", 2.5e12, 600e12)
	if err := h100.WriteFile(path); err != nil { // merges with the H200 entry
		t.Fatal(err)
	}
	back, err := LoadCalibration(path)
	if err != nil {
		t.Fatal(err)
	}
	e := back.GPUs["H200"]
	if e.HBM == nil || *e.HBM < 0.959 || *e.HBM > 0.961 || e.GEMM == nil || *e.GEMM < 0.769 || *e.GEMM > 0.771 {
		t.Errorf("H200 entry %+v", e)
	}
	if _, ok := back.GPUs["H100-SXM-80G"]; !ok {
		t.Errorf("merge lost the H100 entry: %v", back.GPUs)
	}
	// The planner takes the measured efficiency.
	eff := back.apply("H200", g.Efficiency)
	if eff.HBM < 0.959 || eff.HBM > 0.961 {
		t.Errorf("planner efficiency %+v", eff)
	}
	if _, err := MeasuredCalibration("H200", 0, 1); err == nil {
		t.Error("zero bandwidth accepted")
	}
}

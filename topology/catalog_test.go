package topology

import (
	"strings"
	"testing"
)

func TestLookupGPU(t *testing.T) {
	for alias, want := range map[string]string{
		"H100": "H100-SXM-80G", "h100-80g": "H100-SXM-80G", "H100 PCIe": "H100-PCIe-80G", "H200": "H200",
		"A100-40GB": "A100-40G", "A100": "A100-80G", "l40s": "L40S", "B200": "B200", "MI300X": "MI300X",
	} {
		g, err := LookupGPU(alias)
		if err != nil || g.Name != want {
			t.Errorf("LookupGPU(%q) = %q, %v; want %q", alias, g.Name, err, want)
		}
	}
	_, err := LookupGPU("V100")
	if err == nil || !strings.Contains(err.Error(), "MI300X") {
		t.Errorf("unknown GPU error %v should list the catalog", err)
	}
	for _, g := range catalog {
		if g.MemoryBytes <= 0 || g.HBMGBps <= 0 || g.BF16TFLOPS <= 0 || g.PCIeGBps <= 0 ||
			g.Efficiency.HBM <= 0 || g.Efficiency.GEMM <= 0 || g.Efficiency.PCIe <= 0 {
			t.Errorf("%s: incomplete catalog entry %+v", g.Name, g)
		}
	}
	a100, _ := LookupGPU("A100")
	h100, _ := LookupGPU("H100")
	if a100.FP8() || !h100.FP8() {
		t.Error("FP8 support: A100 has none, H100 has it")
	}
}

func TestCalibration(t *testing.T) {
	cal, err := ParseCalibration([]byte("gpus:\n  H100-80G: {hbm: 0.9, kernel_overhead_us: 5}\n"))
	if err != nil {
		t.Fatal(err)
	}
	h100, _ := LookupGPU("H100")
	eff := cal.apply(h100.Name, h100.Efficiency)
	if eff.HBM != 0.9 || eff.KernelOverheadUS != 5 || eff.GEMM != h100.Efficiency.GEMM {
		t.Errorf("applied %+v", eff)
	}
	h200, _ := LookupGPU("H200")
	if got := cal.apply(h200.Name, h200.Efficiency); got != h200.Efficiency {
		t.Errorf("H200 changed by an H100 calibration: %+v", got)
	}
	for doc, want := range map[string]string{
		"gpus:\n  H100: {hbm: 1.5}\n":           "outside",
		"gpus:\n  H100: {bandwidth: 0.5}\n":     "known fields",
		"gpus:\n  TPUv5: {hbm: 0.5}\n":          "unknown GPU",
		"gpus:\n  H100: {pcie_latency_us: 0}\n": "outside",
	} {
		if _, err := ParseCalibration([]byte(doc)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseCalibration(%q) err = %v, want %q", doc, err, want)
		}
	}
}

// A calibration that halves achievable HBM bandwidth must slow the prediction.
func TestCalibrationChangesPrediction(t *testing.T) {
	base := planFor(t, "glm-4.5-air-fp8", "1x2xH100-80G", 8192, 4)
	cal, err := ParseCalibration([]byte("gpus:\n  H100: {hbm: 0.4}\n"))
	if err != nil {
		t.Fatal(err)
	}
	req := airRequest(t, "1x2xH100-80G")
	req.Calibration = cal
	slow, err := Plan(req)
	if err != nil {
		t.Fatal(err)
	}
	if !(slow.Predicted.DecodeTokensPerS < 0.8*base.Predicted.DecodeTokensPerS) {
		t.Errorf("decode %.0f tok/s with hbm 0.4, %.0f with the default", slow.Predicted.DecodeTokensPerS, base.Predicted.DecodeTokensPerS)
	}
}

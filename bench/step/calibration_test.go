package step

import (
	"path/filepath"
	"testing"

	"github.com/glmtopo/glmtopo/topology"
)

// The measurements of a run on an H200 (docs/perf-cuda.md) become a
// calibration file that glmtopo plan accepts.
func TestWriteCalibration(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cal.yaml")
	if err := writeCalibration(path, "NVIDIA H200", 143771<<20, 4.62e12, 760e12); err != nil {
		t.Fatal(err)
	}
	c, err := topology.LoadCalibration(path)
	if err != nil {
		t.Fatal(err)
	}
	e, ok := c.GPUs["H200"]
	if !ok || e.HBM == nil || e.GEMM == nil || *e.HBM <= 0.9 || *e.HBM > 1 || *e.GEMM <= 0.7 || *e.GEMM > 0.8 {
		t.Fatalf("calibration %+v", c.GPUs)
	}
	if err := writeCalibration(path, "Some Unknown GPU", 1<<30, 1e12, 1e12); err == nil {
		t.Error("unknown device accepted")
	}
}

func TestEngineRates(t *testing.T) {
	r := &Report{ReadBW: 4.6e12, GemmFLOPS: 760e12, Results: []Result{
		{Phase: "decode", Bytes: 2e9, StepSeconds: 1e-3},   // 2 TB/s
		{Phase: "decode", Bytes: 5e9, StepSeconds: 2e-3},   // 2.5 TB/s: the best
		{Phase: "prefill", FLOPs: 30e12, StepSeconds: 0.1}, // 300 TFLOP/s
	}}
	if b, f := engineRates(r); b != 2.5e12 || f != 300e12 {
		t.Errorf("rates %g B/s, %g FLOP/s", b, f)
	}
	if b, f := engineRates(&Report{ReadBW: 1, GemmFLOPS: 2}); b != 1 || f != 2 {
		t.Errorf("fallback rates %g %g", b, f)
	}
}

package topology

import (
	"testing"

	"github.com/glmtopo/glmtopo/model"
)

// BenchmarkPlan16x4 plans GLM-4.5-FP8 on 16 hosts × 4 H100s (target: < 1 s per plan).
func BenchmarkPlan16x4(b *testing.B) {
	cfg, err := model.Preset("glm-4.5-fp8")
	if err != nil {
		b.Fatal(err)
	}
	inv, err := ParseHosts("16x4xH100-80G")
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		res, err := Plan(PlanRequest{Model: cfg, Inventory: inv, MaxModelLen: 32768, MaxNumSeqs: 64})
		if err != nil || !res.Feasible {
			b.Fatalf("plan: %v %+v", err, res)
		}
	}
}

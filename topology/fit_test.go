package topology

import (
	"testing"

	"github.com/glmtopo/glmtopo/model"
)

func planFor(t testing.TB, modelName, hosts string, maxLen, seqs int) *PlanResult {
	t.Helper()
	cfg, err := model.Preset(modelName)
	if err != nil {
		t.Fatal(err)
	}
	inv, err := ParseHosts(hosts)
	if err != nil {
		t.Fatal(err)
	}
	res, err := Plan(PlanRequest{Model: cfg, ModelName: modelName, Inventory: inv, MaxModelLen: maxLen, MaxNumSeqs: seqs})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// TestPublishedMinimums checks the fit against zai-org's published minimum
// configurations at 8192 tokens × 4 sequences, and the long-context case.
func TestPublishedMinimums(t *testing.T) {
	cases := []struct {
		model, hosts string
		maxLen, seqs int
		fits         bool
	}{
		{"glm-4.5", "2x4xH200", 8192, 4, true},
		{"glm-4.5", "4x4xH100-80G", 8192, 4, true},
		{"glm-4.5", "2x4xH100-80G", 8192, 4, false},
		{"glm-4.5-fp8", "1x4xH200", 8192, 4, true},
		{"glm-4.5-fp8", "2x4xH100-80G", 8192, 4, true},
		{"glm-4.5-fp8", "1x4xH100-80G", 8192, 4, false},
		{"glm-4.5-air", "1x4xH100-80G", 8192, 4, true},
		{"glm-4.5-air", "1x2xH200", 8192, 4, true},
		{"glm-4.5-air", "1x2xH100-80G", 8192, 4, false},
		{"glm-4.5-air-fp8", "1x2xH100-80G", 8192, 4, true},
		{"glm-4.5-air-fp8", "1x1xH100-80G", 8192, 4, false},
		{"glm-4.5-fp8", "1x4xH200", 131072, 8, false},
		{"glm-4.5-fp8", "2x4xH200", 131072, 8, true},
	}
	for _, c := range cases {
		t.Run(c.model+"/"+c.hosts, func(t *testing.T) {
			res := planFor(t, c.model, c.hosts, c.maxLen, c.seqs)
			t.Logf("%s on %s at %d×%d: feasible=%v\n  %s", c.model, c.hosts, c.maxLen, c.seqs, res.Feasible, res.Reason)
			if res.Feasible {
				t.Logf("  predicted %+v", res.Predicted)
			}
			if res.Feasible != c.fits {
				t.Errorf("feasible = %v, want %v", res.Feasible, c.fits)
			}
		})
	}
}

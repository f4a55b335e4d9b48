package topology

import (
	"math"
	"testing"

	"github.com/glmtopo/glmtopo/model"
)

// Odd inventories plan without panics and give consistent results.
func TestEdgeInventories(t *testing.T) {
	cases := []struct {
		model, hosts string
		fits         bool
	}{
		{"tiny", "16x8xH100-80G", true},        // more GPUs than layers need
		{"tiny", "1x1xL40S", true},             // PCIe-only GPU
		{"glm-4.5-air", "1x3xA100-80G", false}, // TP3 does not divide 8 kv heads; PP3 is 1.4 GiB short
		{"glm-4.5-air", "1x8xMI300X", true},
		{"glm-4.5-fp8", "1x8xB200", true},
		{"glm-4.5", "1x1xA100-40G", false}, // hopeless: no single change fits
		{"glm-4.5-air-fp8", "1x4xL40S", true},
	}
	for _, c := range cases {
		t.Run(c.model+"/"+c.hosts, func(t *testing.T) {
			res := planFor(t, c.model, c.hosts, 4096, 2)
			t.Logf("%s", res.Reason)
			if res.Feasible != c.fits {
				t.Fatalf("feasible = %v, want %v", res.Feasible, c.fits)
			}
			if !res.Feasible {
				return
			}
			p := res.Predicted
			for name, v := range map[string]float64{"decode": p.DecodeTokensPerS, "tpot": p.TPOTMs, "ttft": p.TTFTMs} {
				if !(v > 0) || math.IsInf(v, 0) {
					t.Errorf("%s = %g", name, v)
				}
			}
			if p.KVTokens < 4096*2 {
				t.Errorf("kv tokens %d below the required %d", p.KVTokens, 4096*2)
			}
			prev := 0
			for _, s := range res.Stages {
				if s.Layers[0] != prev || s.Layers[1] <= s.Layers[0] {
					t.Errorf("stage %d layers %v do not continue from %d", s.Index, s.Layers, prev)
				}
				prev = s.Layers[1]
				if 96%s.TP != 0 && c.model != "tiny" {
					t.Errorf("stage %d TP%d does not divide the heads", s.Index, s.TP)
				}
			}
			cfg, _ := model.Preset(c.model)
			if prev != cfg.NumHiddenLayers {
				t.Errorf("layers end at %d, want %d", prev, cfg.NumHiddenLayers)
			}
		})
	}
}

package topology

import (
	"testing"

	"github.com/glmtopo/glmtopo/model"
)

// The head stage (stage 0) holds the embedding, lm_head and the MTP layer
// (design: ../shared/design/distributed.md), and, since their cost counts
// on it, fewer MoE layers than any other stage of the same hardware (the
// first layers are dense and cheaper, so layer counts alone do not show it).
func TestHeadStageHoldsEmbeddingLMHeadAndMTP(t *testing.T) {
	for _, hosts := range []string{"2x4xH200", "3x4xH200", "4x4xH100-80G"} {
		res := planFor(t, "glm-4.5-fp8", hosts, 8192, 64)
		if !res.Feasible {
			t.Fatalf("%s: %s", hosts, res.Reason)
		}
		if len(res.Stages) < 2 {
			t.Fatalf("%s: %d stages; the test needs a pipeline", hosts, len(res.Stages))
		}
		head := res.Stages[0]
		if !head.Embedding || !head.LMHead || !head.MTP {
			t.Errorf("%s: stage 0 holds embedding %v, lm_head %v, mtp %v; want all", hosts, head.Embedding, head.LMHead, head.MTP)
		}
		cfg, err := model.Preset("glm-4.5-fp8")
		if err != nil {
			t.Fatal(err)
		}
		moe := func(s Stage) int {
			n := 0
			for l := s.Layers[0]; l < s.Layers[1]; l++ {
				if cfg.LayerKind(l) != model.LayerDense {
					n++
				}
			}
			return n
		}
		headMoE := moe(head)
		for _, s := range res.Stages[1:] {
			if s.Embedding || s.LMHead || s.MTP {
				t.Errorf("%s: stage %d holds embedding %v, lm_head %v, mtp %v; only the head should", hosts, s.Index, s.Embedding, s.LMHead, s.MTP)
			}
			if n := moe(s); n <= headMoE {
				t.Errorf("%s: stage %d has %d MoE layers, the head %d; the head also runs lm_head and MTP", hosts, s.Index, n, headMoE)
			}
		}
		t.Logf("%s: %s; stage layers %v", hosts, res.Alternatives[0].Summary, stageLayers(res))
	}
}

func stageLayers(res *PlanResult) [][2]int {
	var out [][2]int
	for _, s := range res.Stages {
		out = append(out, s.Layers)
	}
	return out
}

package topology

import (
	"math"
	"testing"

	"github.com/glmtopo/glmtopo/model"
)

// Per-GPU weight memory of a plan agrees within 2% with a sum computed here
// directly from the checkpoint's tensor list, and the KV figures with the
// textbook formula.
func TestMemoryMatchesTensorList(t *testing.T) {
	cases := []struct {
		model, hosts string
		seqs         int
	}{
		{"glm-4.5-fp8", "2x4xH100-80G", 16},
		{"glm-4.5", "4x4xH100-80G", 4},
		{"glm-4.5-air-fp8", "1x4xH100-80G", 64}, // EP stage: experts counted per GPU from the placement
		{"glm-4.5-fp8", "1x4xH200,1x4xH100-80G", 32},
	}
	for _, c := range cases {
		t.Run(c.model+"/"+c.hosts, func(t *testing.T) {
			res := planFor(t, c.model, c.hosts, 8192, c.seqs)
			if !res.Feasible {
				t.Fatal(res.Reason)
			}
			cfg, _ := model.Preset(c.model)
			tensors := cfg.Tensors()
			placement := map[[2]int][][]int{} // (stage, layer) → per-GPU experts
			for _, le := range res.Experts {
				placement[[2]int{le.Stage, le.Layer}] = le.GPUs
			}
			var worst float64
			for _, m := range res.Memory {
				st := res.Stages[m.Stage]
				n := len(st.GPUs)
				local := m.GPU - st.GPUs[0]
				var want float64
				layers := 0
				for _, tn := range tensors {
					in := tn.Layer >= st.Layers[0] && tn.Layer < st.Layers[1] ||
						st.MTP && tn.Layer == cfg.NumHiddenLayers ||
						st.Embedding && tn.Role == model.RoleEmbedding ||
						st.LMHead && (tn.Role == model.RoleLMHead || tn.Role == model.RoleFinalNorm)
					if !in {
						continue
					}
					if tn.Role == model.RoleRoutedExpert && st.EP > 1 {
						for _, e := range placement[[2]int{m.Stage, tn.Layer}][local] {
							if e == tn.Expert {
								want += float64(tn.Bytes())
							}
						}
						continue
					}
					want += float64(tn.Bytes()) / float64(n)
				}
				for l := st.Layers[0]; l < st.Layers[1]; l++ {
					layers++
				}
				if st.MTP {
					layers++
				}
				got := float64(m.WeightsTotal)
				worst = max(worst, math.Abs(got-want)/want)
				if d := math.Abs(got-want) / want; d > 0.02 {
					t.Errorf("%s GPU %d: weights %.2f GiB, tensor list says %.2f GiB (%.1f%% off)", m.Host, m.GPU, got/(1<<30), want/(1<<30), 100*d)
				}
				kvHeads := max(cfg.NumKeyValueHeads/n, 1)
				kv := float64(c.seqs) * 8192 * float64(layers) * 2 * float64(kvHeads*cfg.HeadDim) * 2
				if math.Abs(float64(m.KVRequired)-kv) > 1 {
					t.Errorf("%s GPU %d: KV needed %d, want %.0f", m.Host, m.GPU, m.KVRequired, kv)
				}
				if m.Budget != int64(float64(m.Total)*0.9) || m.KVCache != m.Budget-m.WeightsTotal-m.Activations-m.Graphs-m.Reserve ||
					m.Headroom != m.KVCache-m.KVRequired || m.Headroom < 0 {
					t.Errorf("%s GPU %d: inconsistent accounting %+v", m.Host, m.GPU, m)
				}
				var byKind int64
				for _, v := range m.Weights {
					byKind += v
				}
				if byKind != m.WeightsTotal {
					t.Errorf("weights by kind sum to %d, total says %d", byKind, m.WeightsTotal)
				}
			}
			t.Logf("%s on %s: %d GPUs checked; fullest weights %.2f GiB; largest deviation %.4f%%",
				c.model, c.hosts, len(res.Memory), maxWeights(res)/(1<<30), 100*worst)
		})
	}
}

func maxWeights(res *PlanResult) float64 {
	var m float64
	for _, g := range res.Memory {
		m = max(m, float64(g.WeightsTotal))
	}
	return m
}

// Every weight byte lands on exactly the GPUs it should: summing the plan's
// per-GPU weights over a TP-only plan gives the checkpoint size (replicated
// norms and routers aside).
func TestMemoryCoversCheckpoint(t *testing.T) {
	res := planFor(t, "glm-4.5", "4x4xH100-80G", 8192, 4)
	var sum float64
	for _, m := range res.Memory {
		sum += float64(m.WeightsTotal)
	}
	total := float64(res.Weights.TotalBytes)
	if d := (sum - total) / total; d < 0 || d > 0.002 {
		t.Errorf("per-GPU weights sum to %.2f GiB, checkpoint is %.2f GiB", sum/(1<<30), total/(1<<30))
	}
}

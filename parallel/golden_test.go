package parallel

import (
	"fmt"
	"path/filepath"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/model/modeltest"
)

func loadFixtureEngine(t *testing.T, dir string) *Engine {
	t.Helper()
	be := cpu.New(0)
	w := modeltest.LoadWeights(t, be, dir)
	e, err := NewEngine(be, w, EngineOptions{BlockSize: 16, MaxTokens: 1024})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	return e
}

const goldenTol = 1e-4

func TestGoldenFixtures(t *testing.T) {
	for _, name := range []string{"tiny", "tiny_qknorm"} {
		t.Run(name, func(t *testing.T) {
			root := filepath.Join("..", "testdata", "glm4moe", name)
			e := loadFixtureEngine(t, filepath.Join(root, "model"))
			g := modeltest.OpenGolden(t, root)
			cfg := e.Cfg
			for i := 0; i < 4; i++ {
				prompt := g.IDs(fmt.Sprintf("prompt_%d", i))
				// Hidden states after every layer, for prompt 1.
				var hidden map[int][]float32
				if i == 1 {
					hidden = map[int][]float32{}
					e.OnLayer = func(layer int, h *kernels.Tensor) {
						v, err := e.BE.Download(h)
						if err != nil {
							t.Fatal(err)
						}
						hidden[layer+1] = v
					}
				}
				seq := &Seq{}
				res, err := e.Step([]StepInput{{Seq: seq, Tokens: prompt}}, true)
				e.OnLayer = nil
				if err != nil {
					t.Fatal(err)
				}
				logits, _ := e.BE.Download(res.Logits)
				normed, _ := e.BE.Download(res.Normed)
				want := g.F32(fmt.Sprintf("logits_%d", i))
				if r := modeltest.RelErr(logits, want); r > goldenTol {
					t.Errorf("prompt %d logits: rel err %.3g > %g", i, r, goldenTol)
				} else {
					t.Logf("prompt %d (%d tokens) logits rel err %.2e", i, len(prompt), r)
				}
				wantH := g.F32(fmt.Sprintf("final_hidden_%d", i))
				if r := modeltest.RelErr(normed, wantH); r > goldenTol {
					t.Errorf("prompt %d final hidden: rel err %.3g", i, r)
				}
				if i == 1 {
					for l := 0; l < cfg.NumHiddenLayers; l++ {
						want := g.F32(fmt.Sprintf("hidden_1_%d", l))
						if r := modeltest.RelErr(hidden[l], want); r > goldenTol {
							t.Errorf("prompt 1 hidden after layer %d: rel err %.3g", l-1, r)
						}
					}
					want := g.F32(fmt.Sprintf("hidden_1_%d", cfg.NumHiddenLayers))
					if r := modeltest.RelErr(normed, want); r > goldenTol {
						t.Errorf("prompt 1 final normed hidden: rel err %.3g", r)
					}
				}
				// MTP over the prompt: position t sees final_hidden[t] and token t+1.
				V := cfg.VocabSize
				T := len(prompt)
				next := append(append([]int32(nil), prompt[1:]...), modeltest.Argmax(logits[(T-1)*V:]))
				wantNext := g.IDs(fmt.Sprintf("mtp_input_%d", i))
				for j := range next {
					if next[j] != wantNext[j] {
						t.Fatalf("prompt %d: mtp input %v, golden %v", i, next, wantNext)
					}
				}
				mres, err := e.MTPStep([]StepInput{{Seq: seq, Tokens: next}}, res.Normed)
				if err != nil {
					t.Fatal(err)
				}
				mtp, _ := e.BE.Download(mres.Logits)
				wantM := g.F32(fmt.Sprintf("mtp_logits_%d", i))
				if r := modeltest.RelErr(mtp, wantM); r > goldenTol {
					t.Errorf("prompt %d mtp logits: rel err %.3g", i, r)
				} else {
					t.Logf("prompt %d mtp logits rel err %.2e", i, r)
				}
				mres.Release()
				// Greedy decoding through the KV cache.
				tok := modeltest.Argmax(logits[(T-1)*V:])
				res.Release()
				greedy := []int32{tok}
				for len(greedy) < 16 {
					r, err := e.Step([]StepInput{{Seq: seq, Tokens: []int32{tok}}}, false)
					if err != nil {
						t.Fatal(err)
					}
					l, _ := e.BE.Download(r.Logits)
					r.Release()
					tok = modeltest.Argmax(l)
					greedy = append(greedy, tok)
				}
				wantG := g.IDs(fmt.Sprintf("greedy_%d", i))
				for j := range wantG {
					if greedy[j] != wantG[j] {
						t.Errorf("prompt %d greedy: got %v want %v", i, greedy, wantG)
						break
					}
				}
				e.KV.Release(seq)
			}
		})
	}
}

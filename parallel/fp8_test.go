package parallel

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"path/filepath"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/model/modeltest"
)

// FP8 copies of the fixture (both scale layouts) run through the engine;
// their logits stay near the bf16 golden and their greedy tokens are reported.
func TestFP8FixtureModels(t *testing.T) {
	root := filepath.Join("..", "testdata", "glm4moe", "tiny")
	g := modeltest.OpenGolden(t, root)
	for _, q := range []*model.Quantization{model.FP8PerChannel(), model.FP8Block()} {
		t.Run(q.Scheme.String(), func(t *testing.T) {
			dir := t.TempDir()
			if _, err := model.QuantizeCheckpoint(context.Background(), filepath.Join(root, "model"), dir, q); err != nil {
				t.Fatal(err)
			}
			be := cpu.New(0)
			w := modeltest.LoadWeights(t, be, dir)
			cfg := w.Config
			e, err := NewEngine(be, w, EngineOptions{MaxTokens: 512})
			if err != nil {
				t.Fatal(err)
			}
			defer e.Close()
			// The same weights dequantized to f32 must give the same logits:
			// the FP8 path adds no error beyond the weights' own rounding.
			ref := dequantizedCopy(t, be, w)
			re, err := NewEngine(be, ref, EngineOptions{MaxTokens: 512})
			if err != nil {
				t.Fatal(err)
			}
			defer re.Close()
			for i := 0; i < 4; i++ {
				prompt := g.IDs(fmt.Sprintf("prompt_%d", i))
				rseq := &Seq{}
				rres, err := re.Step([]StepInput{{Seq: rseq, Tokens: prompt}}, true)
				if err != nil {
					t.Fatal(err)
				}
				rlogits, _ := be.Download(rres.Logits)
				rres.Release()
				re.KV.Release(rseq)
				seq := &Seq{}
				res, err := e.Step([]StepInput{{Seq: seq, Tokens: prompt}}, true)
				if err != nil {
					t.Fatal(err)
				}
				logits, _ := be.Download(res.Logits)
				res.Release()
				if r := modeltest.RelErr(logits, rlogits); r > 1e-5 {
					t.Errorf("prompt %d: fp8 weights vs the same weights in f32: rel err %.3g", i, r)
				}
				want := g.F32(fmt.Sprintf("logits_%d", i))
				// Random-weight models amplify weight noise (a flipped expert choice
				// changes a token's output entirely), so compare direction, not max error.
				r := modeltest.RelErr(logits, want)
				cos := cosine(logits, want)
				if cos < 0.85 {
					t.Errorf("prompt %d: fp8 logits cosine %.3f to the bf16 golden", i, cos)
				}
				V := cfg.VocabSize
				tok := modeltest.Argmax(logits[(len(prompt)-1)*V:])
				greedy := []int32{tok}
				for len(greedy) < 16 {
					r, err := e.Step([]StepInput{{Seq: seq, Tokens: []int32{tok}}}, false)
					if err != nil {
						t.Fatal(err)
					}
					l, _ := be.Download(r.Logits)
					r.Release()
					tok = modeltest.Argmax(l)
					greedy = append(greedy, tok)
				}
				e.KV.Release(seq)
				same := 0
				for j, v := range g.IDs(fmt.Sprintf("greedy_%d", i)) {
					if greedy[j] != v {
						break
					}
					same++
				}
				t.Logf("prompt %d: logits cosine %.4f, max rel err %.2e vs bf16 golden; greedy %v (first %d equal to bf16)", i, cos, r, greedy, same)
			}
		})
	}
}

func cosine(a, b []float32) float64 {
	var ab, aa, bb float64
	for i := range a {
		ab += float64(a[i]) * float64(b[i])
		aa += float64(a[i]) * float64(a[i])
		bb += float64(b[i]) * float64(b[i])
	}
	return ab / math.Sqrt(aa*bb)
}

// dequantizedCopy returns w with every FP8 weight replaced by an F32 tensor of
// its effective values (read back through Linear on an identity matrix).
func dequantizedCopy(t *testing.T, be kernels.Backend, w *model.Weights) *model.Weights {
	t.Helper()
	deq := func(p **kernels.Tensor) {
		x := *p
		if x == nil || x.DType != kernels.F8E4M3 {
			return
		}
		n, k := x.Shape[0], x.Shape[1]
		eye, _ := be.NewTensor(kernels.F32, k, k)
		id := make([]byte, 4*k*k)
		for i := 0; i < k; i++ {
			binary.LittleEndian.PutUint32(id[4*(i*k+i):], math.Float32bits(1))
		}
		be.Upload(eye, id)
		out, _ := be.NewTensor(kernels.F32, k, n)
		if err := be.Linear(out, eye, x, nil); err != nil {
			t.Fatal(err)
		}
		v, _ := be.Download(out)
		b := make([]byte, 4*n*k)
		for r := 0; r < n; r++ {
			for c := 0; c < k; c++ {
				binary.LittleEndian.PutUint32(b[4*(r*k+c):], math.Float32bits(v[c*n+r]))
			}
		}
		f, err := be.UploadWeight(kernels.F32, []int{n, k}, b)
		if err != nil {
			t.Fatal(err)
		}
		*p = f
	}
	c := *w
	c.Layers = nil
	layer := func(lw *model.LayerWeights) *model.LayerWeights {
		if lw == nil {
			return nil
		}
		l := *lw
		for _, p := range []**kernels.Tensor{&l.Q, &l.K, &l.V, &l.O, &l.Gate, &l.Up, &l.Down,
			&l.SharedGate, &l.SharedUp, &l.SharedDown, &l.EHProj, &l.Head} {
			deq(p)
		}
		l.Experts = nil
		for _, ex := range lw.Experts {
			if ex == nil {
				l.Experts = append(l.Experts, nil)
				continue
			}
			e := *ex
			deq(&e.Gate)
			deq(&e.Up)
			deq(&e.Down)
			l.Experts = append(l.Experts, &e)
		}
		return &l
	}
	for _, lw := range w.Layers {
		c.Layers = append(c.Layers, layer(lw))
	}
	c.MTP = layer(w.MTP)
	deq(&c.LMHead)
	return &c
}

package cuda_test

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/kernels/cuda/cudatest"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/model/modeltest"
	"github.com/glmtopo/glmtopo/parallel"
)

// TestFP8CheckpointsOnGPU quantizes both fixtures with
// model.QuantizeCheckpoint (per-channel and 128×128 block scales), loads the
// same FP8 checkpoint on the GPU and on the CPU reference, and compares prompt
// logits, MTP logits and greedy tokens (up to the first step where the CPU's
// top-2 gap is under 1%). The GPU runs every FP8 path a prompt reaches: the
// tensor-core GEMV for short rows, dequantize + cuBLAS for wide ones, and the
// routed-expert kernels on e4m3 experts.
func TestFP8CheckpointsOnGPU(t *testing.T) {
	gb := cudatest.Open(t, cuda.Options{})
	cb := cpu.New(2)
	for _, fixture := range []string{"tiny", "tiny_qknorm"} {
		root := filepath.Join("..", "..", "testdata", "glm4moe", fixture)
		gold := modeltest.OpenGolden(t, root)
		for _, q := range []*model.Quantization{model.FP8PerChannel(), model.FP8Block()} {
			t.Run(fmt.Sprintf("%s/%v", fixture, q.Scheme), func(t *testing.T) {
				dir := t.TempDir()
				if _, err := model.QuantizeCheckpoint(context.Background(), filepath.Join(root, "model"), dir, q); err != nil {
					t.Fatal(err)
				}
				g := engine(t, gb, dir, kernels.F32)
				c := engine(t, cb, dir, kernels.F32)
				V := g.Cfg.VocabSize
				for i := 0; i < 4; i++ {
					prompt := gold.IDs(fmt.Sprintf("prompt_%d", i))
					compareFP8Prompt(t, g, c, prompt, V, i)
				}
			})
		}
	}
}

// compareFP8Prompt runs one prompt on the GPU engine g and the CPU engine c
// (same FP8 weights): prompt logits, MTP logits, then greedy decoding.
func compareFP8Prompt(t *testing.T, g, c *parallel.Engine, prompt []int32, V, i int) {
	t.Helper()
	T := len(prompt)
	gs, cs := &parallel.Seq{}, &parallel.Seq{}
	defer g.KV.Release(gs)
	defer c.KV.Release(cs)
	gres, err := g.Step([]parallel.StepInput{{Seq: gs, Tokens: prompt}}, true)
	if err != nil {
		t.Fatal(err)
	}
	defer gres.Release()
	cres, err := c.Step([]parallel.StepInput{{Seq: cs, Tokens: prompt}}, true)
	if err != nil {
		t.Fatal(err)
	}
	defer cres.Release()
	gl, cl := download(t, g.BE, gres.Logits), download(t, c.BE, cres.Logits)
	if r := modeltest.RelErr(gl, cl); r > goldenTol {
		t.Errorf("prompt %d (%d tokens) fp8 logits: gpu vs cpu rel err %.3g > %g", i, T, r, goldenTol)
	} else {
		t.Logf("prompt %d (%d tokens) fp8 logits gpu vs cpu rel err %.2e", i, T, r)
	}
	if g.W.MTP != nil {
		next := append(append([]int32(nil), prompt[1:]...), modeltest.Argmax(cl[(T-1)*V:]))
		gm, err := g.MTPStep([]parallel.StepInput{{Seq: gs, Tokens: next}}, gres.Normed)
		if err != nil {
			t.Fatal(err)
		}
		cm, err := c.MTPStep([]parallel.StepInput{{Seq: cs, Tokens: next}}, cres.Normed)
		if err != nil {
			t.Fatal(err)
		}
		if r := modeltest.RelErr(download(t, g.BE, gm.Logits), download(t, c.BE, cm.Logits)); r > goldenTol {
			t.Errorf("prompt %d fp8 mtp logits: gpu vs cpu rel err %.3g > %g", i, r, goldenTol)
		} else {
			t.Logf("prompt %d fp8 mtp logits rel err %.2e", i, r)
		}
		gm.Release()
		cm.Release()
	}
	tok, ctok := modeltest.Argmax(gl[(T-1)*V:]), modeltest.Argmax(cl[(T-1)*V:])
	last := cl[(T-1)*V:]
	for step := 0; step < 16; step++ {
		if modeltest.TopGap(last) < 0.01 {
			t.Logf("prompt %d: top-2 gap under 1%% at step %d; greedy compared up to here", i, step)
			return
		}
		if tok != ctok {
			t.Errorf("prompt %d greedy step %d: gpu %d cpu %d", i, step, tok, ctok)
			return
		}
		r, err := g.Step([]parallel.StepInput{{Seq: gs, Tokens: []int32{tok}}}, false)
		if err != nil {
			t.Fatal(err)
		}
		tok = modeltest.Argmax(download(t, g.BE, r.Logits))
		r.Release()
		cr, err := c.Step([]parallel.StepInput{{Seq: cs, Tokens: []int32{ctok}}}, false)
		if err != nil {
			t.Fatal(err)
		}
		last = download(t, c.BE, cr.Logits)
		ctok = modeltest.Argmax(last)
		cr.Release()
	}
	t.Logf("prompt %d: 16 greedy tokens equal", i)
}

package model

import (
	"bytes"
	"fmt"
	"math"
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
)

// TestDummyWeights: every tensor of the tiny preset (bf16, FP8 per channel
// and in 128×128 blocks) is made with its checkpoint shape and dtype, a
// forward step through them stays finite, the values are a function of the
// seed, and free releases every tensor.
func TestDummyWeights(t *testing.T) {
	base, err := Preset("tiny")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		q    *Quantization
	}{{"bf16", nil}, {"fp8-channel", FP8PerChannel()}, {"fp8-block", FP8Block()}} {
		t.Run(tc.name, func(t *testing.T) {
			c := base.Clone()
			c.Quantization = tc.q
			be := cpu.New(2)
			w, free, err := DummyWeights(c, WholeModel(c), be, 7)
			if err != nil {
				t.Fatal(err)
			}
			if len(w.Layers) != c.NumHiddenLayers || w.Embed == nil || w.LMHead == nil || w.FinalNorm == nil || (c.HasMTP() && w.MTP == nil) {
				t.Fatalf("incomplete weights: %d layers, embed %v, lm_head %v, mtp %v", len(w.Layers), w.Embed != nil, w.LMHead != nil, w.MTP != nil)
			}
			var want int64
			for _, s := range c.Tensors() {
				want += s.Bytes()
			}
			// 1-D bf16 tensors (norms, biases) are made as f32, as UploadWeight makes them.
			if w.Bytes < want {
				t.Errorf("weights hold %d bytes, the tensor list %d", w.Bytes, want)
			}
			q := w.Layers[len(w.Layers)-1].Q
			if tc.q != nil && (q.DType != kernels.F8E4M3 || q.Scale == nil) {
				t.Errorf("q_proj of an FP8 model is %v (scale %v)", q.DType, q.Scale != nil)
			}
			if tc.q == nil && q.DType != kernels.BF16 {
				t.Errorf("q_proj of a bf16 model is %v", q.DType)
			}
			if norm, _ := be.Download(w.FinalNorm); norm[0] != 1 {
				t.Errorf("final norm starts %v, want ones", norm[0])
			}
			f := &Forward{Cfg: c, BE: be, T: 3}
			h, err := f.Embed(w.Embed, []int32{1, 2, 3})
			if err != nil {
				t.Fatal(err)
			}
			_, logits, err := f.Head(h, w.FinalNorm, w.LMHead)
			if err != nil {
				t.Fatal(err)
			}
			out, _ := be.Download(logits)
			for i, v := range out {
				if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
					t.Fatalf("logit %d is %v", i, v)
				}
			}
			w2, free2, err := DummyWeights(c, WholeModel(c), be, 7)
			if err != nil {
				t.Fatal(err)
			}
			a, _ := be.Download(w.Layers[0].InputNorm)
			b, _ := be.Download(w2.Layers[0].QBias)
			c0, _ := be.Download(w.Layers[0].QBias)
			if a[0] != 1 || b[0] != c0[0] {
				t.Errorf("same seed, different weights: q bias %v vs %v", b[0], c0[0])
			}
			free2()
			free()
			if w.LMHead.Impl != nil {
				t.Error("free left lm_head allocated")
			}
		})
	}
}

func TestDummyWeightsNeedAFiller(t *testing.T) {
	c, _ := Preset("tiny")
	_, _, err := DummyWeights(c, WholeModel(c), noFill{cpu.New(1)}, 1)
	if err == nil || !strings.Contains(err.Error(), "cannot fill") {
		t.Fatalf("want a clear error from a backend without Fill, got %v", err)
	}
}

// noFill hides the CPU backend's Filler.
type noFill struct{ kernels.Backend }

// A stage's dummy tensors are the whole model's: a split run on dummy
// weights can be compared with one process.
func TestDummyStageMatchesWholeModel(t *testing.T) {
	c, _ := Preset("tiny")
	be := cpu.New(1)
	whole, freeWhole, err := DummyWeights(c, WholeModel(c), be, 3)
	if err != nil {
		t.Fatal(err)
	}
	defer freeWhole()
	stage, freeStage, err := DummyWeights(c, Selection{FirstLayer: 1, EndLayer: c.NumHiddenLayers}, be, 3)
	if err != nil {
		t.Fatal(err)
	}
	defer freeStage()
	other, freeOther, err := DummyWeights(c, Selection{FirstLayer: 1, EndLayer: c.NumHiddenLayers}, be, 4)
	if err != nil {
		t.Fatal(err)
	}
	defer freeOther()
	for i, lw := range stage.Layers {
		wl := whole.Layers[i+1]
		for name, pair := range map[string][2]*kernels.Tensor{"q_proj": {lw.Q, wl.Q}, "input norm": {lw.InputNorm, wl.InputNorm},
			"router": {lw.Router, wl.Router}} {
			if pair[0] == nil {
				continue
			}
			a, b := tensorBytes(t, be, pair[0]), tensorBytes(t, be, pair[1])
			if !bytes.Equal(a, b) {
				t.Errorf("layer %d %s differs between the stage's and the whole model's dummy weights", lw.Index, name)
			}
		}
	}
	if bytes.Equal(tensorBytes(t, be, stage.Layers[0].Q), tensorBytes(t, be, other.Layers[0].Q)) {
		t.Error("seeds 3 and 4 made the same q_proj")
	}
}

// tensorBytes is a CPU tensor's contents, whatever its element type.
func tensorBytes(t *testing.T, _ kernels.Backend, x *kernels.Tensor) []byte {
	t.Helper()
	if x.Impl == nil {
		t.Fatal("tensor without contents")
	}
	return []byte(fmt.Sprint(x.Impl))
}

package step

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
)

func TestFlagErrors(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--batch", "1,x"}, "bad batch size"},
		{[]string{"--batch", "0"}, "bad batch size"},
		{[]string{"--load-format", "auto"}, "only dummy"},
		{[]string{"--layers", "0"}, "must be positive"},
		{[]string{"--iters", "-1"}, "must be positive"},
		{[]string{"--nope"}, "flag provided but not defined"},
	} {
		var out, errb bytes.Buffer
		err := Run(context.Background(), c.args, &out, &errb)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: error %v, want %q", c.args, err, c.want)
		}
	}
}

func TestLoadConfig(t *testing.T) {
	c, err := loadConfig("synth:glm-4.5-air-fp8", 3)
	if err != nil {
		t.Fatal(err)
	}
	if c.NumHiddenLayers != 3 || c.Quantization == nil || c.HiddenSize != 4096 {
		t.Fatalf("config: %d layers, quant %v, hidden %d", c.NumHiddenLayers, c.Quantization, c.HiddenSize)
	}
	if _, err := loadConfig("synth:glm-4.5-air", 47); err == nil {
		t.Fatal("47 layers of a 46-layer model accepted")
	}
	if _, err := loadConfig("synth:nonesuch", 1); err == nil {
		t.Fatal("unknown preset accepted")
	}
}

func tensor(dt kernels.DType, shape ...int) *kernels.Tensor {
	return &kernels.Tensor{DType: dt, Shape: shape}
}

// TestFloorBytes checks the accounting on a hand-built two-layer model:
// a dense layer, then an MoE layer of which three experts were touched.
func TestFloorBytes(t *testing.T) {
	c := &model.Config{HiddenSize: 8, NumKeyValueHeads: 2, HeadDim: 4, VocabSize: 10, NumAttentionHeads: 4,
		IntermediateSize: 16, MoEIntermediateSize: 6, NRoutedExperts: 4, NumExpertsPerTok: 2, NSharedExperts: 1}
	attn := func(lw *model.LayerWeights) {
		lw.InputNorm, lw.PostNorm = tensor(kernels.F32, 8), tensor(kernels.F32, 8)
		lw.Q, lw.K, lw.V, lw.O = tensor(kernels.BF16, 16, 8), tensor(kernels.BF16, 8, 8), tensor(kernels.BF16, 8, 8), tensor(kernels.BF16, 8, 16)
	}
	dense := &model.LayerWeights{Kind: model.LayerDense}
	attn(dense)
	dense.Gate, dense.Up, dense.Down = tensor(kernels.BF16, 16, 8), tensor(kernels.BF16, 16, 8), tensor(kernels.BF16, 8, 16)
	moe := &model.LayerWeights{Kind: model.LayerMoE}
	attn(moe)
	moe.Router, moe.RouterBias = tensor(kernels.BF16, 4, 8), tensor(kernels.F32, 4)
	fp8 := func(n, k int) *kernels.Tensor {
		w := tensor(kernels.F8E4M3, n, k)
		w.Scale, w.ScaleLayout = tensor(kernels.F32, n), kernels.ScalePerChannel
		return w
	}
	for range 4 {
		moe.Experts = append(moe.Experts, &kernels.Expert{Gate: fp8(6, 8), Up: fp8(6, 8), Down: fp8(8, 6)})
	}
	moe.SharedGate, moe.SharedUp, moe.SharedDown = tensor(kernels.BF16, 6, 8), tensor(kernels.BF16, 6, 8), tensor(kernels.BF16, 8, 6)
	b := &bench{cfg: c, kvElem: 2, w: &model.Weights{Config: c, Layers: []*model.LayerWeights{dense, moe},
		Embed: tensor(kernels.BF16, 10, 8), LMHead: tensor(kernels.BF16, 10, 8), FinalNorm: tensor(kernels.F32, 8)}}
	total, parts := b.floorBytes(3, 100, 3, []int{3})
	attnBytes := int64(2*(2*8*4) + 2*2*(16*8+8*8+8*8+8*16))
	want := map[string]int64{
		"attention":      attnBytes,
		"dense_mlp":      2 * 3 * 16 * 8,
		"router":         2*4*8 + 4*4,
		"shared_expert":  2 * 3 * 6 * 8,
		"routed_experts": 3 * (3*6*8 + (6+6+8)*4),
		"kv_cache":       100 * 2 * 2 * (2 * 4) * 2,
		"embedding_rows": 3 * 8 * 2,
		"lm_head":        10*8*2 + 8*4,
	}
	var sum int64
	for k, v := range want {
		if parts[k] != v {
			t.Errorf("%s: %d bytes, want %d", k, parts[k], v)
		}
		sum += v
	}
	if total != sum {
		t.Errorf("total %d, want %d", total, sum)
	}
}

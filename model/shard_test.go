package model

import (
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/model/safetensors"
)

// TestShardSplits: how a rank cuts each kind of tensor of the tiny preset
// (4 heads of 32, 2 KV heads, dense MLP 384, experts 64).
func TestShardSplits(t *testing.T) {
	c, err := Resolve("tiny")
	if err != nil {
		t.Fatal(err)
	}
	spec := map[string]TensorSpec{}
	for _, s := range c.Tensors() {
		spec[s.Name] = s
	}
	for _, tc := range []struct {
		shard Shard
		name  string
		want  Split
	}{
		{Shard{2, 1, 2, 1}, "model.layers.1.self_attn.q_proj.weight", Split{0, 64, 128}},
		{Shard{2, 1, 2, 1}, "model.layers.1.self_attn.q_proj.bias", Split{0, 64, 128}},
		{Shard{2, 1, 2, 1}, "model.layers.1.self_attn.k_proj.weight", Split{0, 32, 64}},
		{Shard{4, 1, 4, 1}, "model.layers.1.self_attn.v_proj.bias", Split{0, 0, 32}}, // KV head 0, shared with rank 0
		{Shard{4, 2, 4, 2}, "model.layers.1.self_attn.k_proj.weight", Split{0, 32, 64}},
		{Shard{4, 3, 1, 0}, "model.layers.1.self_attn.o_proj.weight", Split{1, 96, 128}},
		{Shard{2, 0, 2, 0}, "model.layers.1.self_attn.q_norm.weight", whole},
		{Shard{2, 1, 2, 1}, "model.layers.0.mlp.gate_proj.weight", Split{0, 192, 384}},
		{Shard{2, 1, 2, 1}, "model.layers.0.mlp.down_proj.weight", Split{1, 192, 384}},
		{Shard{4, 1, 2, 1}, "model.layers.1.mlp.shared_experts.up_proj.weight", Split{0, 16, 32}},
		{Shard{4, 1, 2, 1}, "model.layers.1.mlp.experts.3.down_proj.weight", Split{1, 32, 64}},
		{Shard{4, 1, 1, 0}, "model.layers.1.mlp.experts.3.gate_proj.weight", whole}, // whole experts: no cut
		{Shard{2, 1, 2, 1}, "model.layers.1.mlp.gate.weight", whole},
		{Shard{2, 1, 2, 1}, "model.embed_tokens.weight", whole},
		{Shard{2, 1, 2, 1}, "model.layers.1.input_layernorm.weight", whole},
	} {
		got, err := tc.shard.SplitOf(c, spec[tc.name])
		if err != nil || got != tc.want {
			t.Errorf("%+v %s: %+v, %v; want %+v", tc.shard, tc.name, got, err, tc.want)
		}
	}
}

func TestShardFP8Scales(t *testing.T) {
	base, err := Resolve("tiny")
	if err != nil {
		t.Fatal(err)
	}
	block := base.Clone()
	block.Quantization = FP8Block()
	block.HiddenSize, block.HeadDim, block.IntermediateSize, block.MoEIntermediateSize = 256, 128, 512, 256
	perCh := base.Clone()
	perCh.Quantization = FP8PerChannel()
	find := func(c *Config, name string) TensorSpec {
		for _, s := range c.Tensors() {
			if s.Name == name {
				return s
			}
		}
		t.Fatalf("no tensor %s", name)
		return TensorSpec{}
	}
	sh := Shard{TP: 2, TPRank: 1, ExpertTP: 2, ExpertTPRank: 1}
	for _, tc := range []struct {
		c    *Config
		name string
		want Split
	}{
		{block, "model.layers.1.self_attn.q_proj.weight_scale_inv", Split{0, 2, 4}}, // rows [256,512) of 128-blocks
		{block, "model.layers.1.self_attn.o_proj.weight_scale_inv", Split{1, 2, 4}}, // columns [256,512)
		{block, "model.layers.1.mlp.experts.0.down_proj.weight_scale_inv", Split{1, 1, 2}},
		{perCh, "model.layers.1.self_attn.q_proj.weight_scale", Split{0, 64, 128}},
		{perCh, "model.layers.1.self_attn.o_proj.weight_scale", whole}, // per output row: o keeps every row
	} {
		got, err := sh.SplitOf(tc.c, find(tc.c, tc.name))
		if err != nil || got != tc.want {
			t.Errorf("%s: %+v, %v; want %+v", tc.name, got, err, tc.want)
		}
	}
	four := Shard{TP: 4, TPRank: 1, ExpertTP: 1}
	if err := four.Validate(block); err == nil || !strings.Contains(err.Error(), "FP8 block of 128") {
		t.Errorf("TP4 cutting 256 KV rows into 64: err %v, want a block-alignment error", err)
	}
	if err := four.Validate(perCh); err != nil {
		t.Errorf("per-channel FP8 splits anywhere: %v", err)
	}
}

// TestCutTensor: rows alias the stored bytes, columns are copied.
func TestCutTensor(t *testing.T) {
	data := []byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11} // 2×3 bf16
	st := safetensors.Tensor{TensorInfo: safetensors.TensorInfo{Name: "w", DType: safetensors.BF16, Shape: []int64{2, 3}}, Data: data}
	rows, err := cutTensor(st, Split{0, 1, 2})
	if err != nil || string(rows.Data) != string(data[6:]) || &rows.Data[0] != &data[6] || rows.Shape[0] != 1 {
		t.Errorf("rows: %v %v %v", rows.Data, rows.Shape, err)
	}
	cols, err := cutTensor(st, Split{1, 1, 3})
	if want := []byte{2, 3, 4, 5, 8, 9, 10, 11}; err != nil || string(cols.Data) != string(want) || cols.Shape[1] != 2 {
		t.Errorf("columns: %v %v %v, want %v", cols.Data, cols.Shape, err, want)
	}
	if _, err := cutTensor(st, Split{1, 2, 4}); err == nil {
		t.Error("columns past the end: no error")
	}
}

// TestDummyShards: a rank's dummy tensors have its slices' shapes; ranks
// holding the same KV head get the same values; uncut tensors equal the
// whole model's.
func TestDummyShards(t *testing.T) {
	c, err := Resolve("tiny")
	if err != nil {
		t.Fatal(err)
	}
	be := cpu.New(1)
	load := func(sh *Shard) *Weights {
		w, _, err := DummyWeights(c, Selection{FirstLayer: 0, EndLayer: 2, Shard: sh}, be, 3)
		if err != nil {
			t.Fatal(err)
		}
		return w
	}
	whole := load(nil)
	r0, r1 := load(&Shard{4, 0, 4, 0}), load(&Shard{4, 1, 4, 1})
	l := r1.Layers[1]
	if l.Q.Shape[0] != 32 || l.K.Shape[0] != 32 || l.O.Shape[1] != 32 || l.SharedGate.Shape[0] != 16 || l.Experts[0].Down.Shape[1] != 16 {
		t.Errorf("rank 1 of TP4 shapes: q %v k %v o %v shared %v expert down %v", l.Q.Shape, l.K.Shape, l.O.Shape, l.SharedGate.Shape, l.Experts[0].Down.Shape)
	}
	if r0.Layers[1].K.Impl.([]uint16)[5] != l.K.Impl.([]uint16)[5] {
		t.Error("ranks 0 and 1 share KV head 0 but got different k_proj values")
	}
	if whole.Layers[1].Router.Impl.([]uint16)[7] != l.Router.Impl.([]uint16)[7] {
		t.Error("the replicated router differs from the whole model's")
	}
	if err := (&Shard{3, 0, 1, 0}).Validate(c); err == nil {
		t.Error("TP 3 over 4 heads: no error")
	}
}

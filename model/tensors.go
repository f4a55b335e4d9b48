package model

import (
	"fmt"
	"strings"
)

// DType names a tensor element type with safetensors' spelling.
type DType string

const (
	F32    DType = "F32"
	BF16   DType = "BF16"
	F16    DType = "F16"
	F8E4M3 DType = "F8_E4M3"
	I64    DType = "I64"
)

// Size is the element size in bytes.
func (d DType) Size() int {
	switch d {
	case F32:
		return 4
	case BF16, F16:
		return 2
	case F8E4M3:
		return 1
	case I64:
		return 8
	}
	return 0
}

// TensorRole groups tensors for memory accounting and placement.
type TensorRole string

const (
	RoleEmbedding    TensorRole = "embedding"     // model.embed_tokens
	RoleLMHead       TensorRole = "lm_head"       // lm_head
	RoleFinalNorm    TensorRole = "final_norm"    // model.norm
	RoleNorm         TensorRole = "norm"          // per-layer norms
	RoleAttention    TensorRole = "attention"     // q/k/v/o projections, biases, q/k norms
	RoleDenseMLP     TensorRole = "dense_mlp"     // MLP of layers < first_k_dense_replace
	RoleRouter       TensorRole = "router"        // mlp.gate weight and correction bias
	RoleSharedExpert TensorRole = "shared_expert" // mlp.shared_experts
	RoleRoutedExpert TensorRole = "routed_expert" // mlp.experts.E
	RoleMTP          TensorRole = "mtp"           // MTP-only tensors: enorm, hnorm, eh_proj, embed copy, shared_head
)

// TensorSpec is one tensor of a checkpoint.
type TensorSpec struct {
	Name   string
	Shape  []int64
	DType  DType
	Role   TensorRole
	Layer  int // decoder layer, -1 for model-level tensors
	Expert int // routed expert index, -1 otherwise
	// ScaleOf names the weight this FP8 scale belongs to ("" for other tensors).
	ScaleOf string
}

// Elements is the product of the shape.
func (t TensorSpec) Elements() int64 {
	n := int64(1)
	for _, d := range t.Shape {
		n *= d
	}
	return n
}

// Bytes is the stored size.
func (t TensorSpec) Bytes() int64 { return t.Elements() * int64(t.DType.Size()) }

// tensorList builds specs; it knows how linear weights are stored under c's quantization.
type tensorList struct {
	c   *Config
	out []TensorSpec
}

func (l *tensorList) add(name string, role TensorRole, layer, expert int, dt DType, shape ...int64) {
	l.out = append(l.out, TensorSpec{Name: name, Shape: shape, DType: dt, Role: role, Layer: layer, Expert: expert})
}

// linear adds module.weight [out,in] (+ FP8 scale) and optionally module.bias.
func (l *tensorList) linear(module string, role TensorRole, layer, expert int, out, in int64, bias bool) {
	q := l.c.Quantization
	if q.Quantized(module) {
		l.add(module+".weight", role, layer, expert, F8E4M3, out, in)
		switch q.Scheme {
		case QuantPerChannel:
			l.out = append(l.out, TensorSpec{Name: module + ".weight_scale", Shape: []int64{out, 1}, DType: F32,
				Role: role, Layer: layer, Expert: expert, ScaleOf: module + ".weight"})
		case QuantBlock:
			b0, b1 := int64(q.BlockSize[0]), int64(q.BlockSize[1])
			name := module + ".weight_scale_inv"
			if q.Method == "compressed-tensors" {
				name = module + ".weight_scale"
			}
			l.out = append(l.out, TensorSpec{Name: name, Shape: []int64{(out + b0 - 1) / b0, (in + b1 - 1) / b1},
				DType: F32, Role: role, Layer: layer, Expert: expert, ScaleOf: module + ".weight"})
		}
	} else {
		l.add(module+".weight", role, layer, expert, BF16, out, in)
	}
	if bias {
		l.add(module+".bias", role, layer, expert, BF16, out)
	}
}

// LayerTensors lists the tensors of decoder layer i (the MTP layer's own extras included).
func (c *Config) LayerTensors(i int) []TensorSpec {
	l := &tensorList{c: c}
	c.layerTensors(l, i)
	return l.out
}

func (c *Config) layerTensors(l *tensorList, i int) {
	h := int64(c.HiddenSize)
	p := fmt.Sprintf("model.layers.%d.", i)
	kind := c.LayerKind(i)
	if kind == LayerMTP {
		// vLLM/SGLang order: enorm, hnorm, eh_proj, then the decoder layer, then shared_head.
		l.add(p+"embed_tokens.weight", RoleMTP, i, -1, BF16, int64(c.VocabSize), h)
		l.add(p+"enorm.weight", RoleMTP, i, -1, BF16, h)
		l.add(p+"hnorm.weight", RoleMTP, i, -1, BF16, h)
		l.linear(p+"eh_proj", RoleMTP, i, -1, h, 2*h, false)
		l.add(p+"shared_head.norm.weight", RoleMTP, i, -1, BF16, h)
		l.linear(p+"shared_head.head", RoleMTP, i, -1, int64(c.VocabSize), h, false)
	}
	l.add(p+"input_layernorm.weight", RoleNorm, i, -1, BF16, h)
	l.add(p+"post_attention_layernorm.weight", RoleNorm, i, -1, BF16, h)
	a := p + "self_attn."
	l.linear(a+"q_proj", RoleAttention, i, -1, int64(c.QDim()), h, c.AttentionBias)
	l.linear(a+"k_proj", RoleAttention, i, -1, int64(c.KVDim()), h, c.AttentionBias)
	l.linear(a+"v_proj", RoleAttention, i, -1, int64(c.KVDim()), h, c.AttentionBias)
	l.linear(a+"o_proj", RoleAttention, i, -1, h, int64(c.QDim()), false)
	if c.UseQKNorm {
		l.add(a+"q_norm.weight", RoleAttention, i, -1, BF16, int64(c.HeadDim))
		l.add(a+"k_norm.weight", RoleAttention, i, -1, BF16, int64(c.HeadDim))
	}
	m := p + "mlp."
	if kind == LayerDense {
		inter := int64(c.IntermediateSize)
		l.linear(m+"gate_proj", RoleDenseMLP, i, -1, inter, h, false)
		l.linear(m+"up_proj", RoleDenseMLP, i, -1, inter, h, false)
		l.linear(m+"down_proj", RoleDenseMLP, i, -1, h, inter, false)
		return
	}
	e := int64(c.NRoutedExperts)
	mi := int64(c.MoEIntermediateSize)
	l.add(m+"gate.weight", RoleRouter, i, -1, BF16, e, h)
	l.add(m+"gate.e_score_correction_bias", RoleRouter, i, -1, F32, e)
	for x := 0; x < c.NRoutedExperts; x++ {
		ep := fmt.Sprintf("%sexperts.%d.", m, x)
		l.linear(ep+"gate_proj", RoleRoutedExpert, i, x, mi, h, false)
		l.linear(ep+"up_proj", RoleRoutedExpert, i, x, mi, h, false)
		l.linear(ep+"down_proj", RoleRoutedExpert, i, x, h, mi, false)
	}
	if c.NSharedExperts > 0 {
		si := mi * int64(c.NSharedExperts)
		l.linear(m+"shared_experts.gate_proj", RoleSharedExpert, i, -1, si, h, false)
		l.linear(m+"shared_experts.up_proj", RoleSharedExpert, i, -1, si, h, false)
		l.linear(m+"shared_experts.down_proj", RoleSharedExpert, i, -1, h, si, false)
	}
}

// Tensors lists every tensor of the checkpoint in a stable order:
// embeddings, layers 0..NumLayers-1 (the MTP layer last), final norm, lm_head.
func (c *Config) Tensors() []TensorSpec {
	l := &tensorList{c: c}
	h := int64(c.HiddenSize)
	l.add("model.embed_tokens.weight", RoleEmbedding, -1, -1, BF16, int64(c.VocabSize), h)
	for i := 0; i < c.NumLayers(); i++ {
		c.layerTensors(l, i)
	}
	l.add("model.norm.weight", RoleFinalNorm, -1, -1, BF16, h)
	l.linear("lm_head", RoleLMHead, -1, -1, int64(c.VocabSize), h, false)
	return l.out
}

// ParamCounts are parameter totals (scales excluded) of a checkpoint.
type ParamCounts struct {
	Total  int64 // every parameter, MTP included
	Main   int64 // without the MTP layer
	MTP    int64 // the MTP layer (with its embedding and head copies)
	Active int64 // parameters used per token by the main model: all but the unchosen routed experts
	// ActiveNonEmbedding is Active without the embedding table and lm_head,
	// the way model cards count "active" parameters (GLM-4.5: 32B, Air: 12B).
	ActiveNonEmbedding int64
	// RoutedExpert is one routed expert's parameter count.
	RoutedExpert int64
}

// Params counts parameters from the tensor list.
func (c *Config) Params() ParamCounts {
	var p ParamCounts
	var routed int64
	for _, t := range c.Tensors() {
		if t.ScaleOf != "" {
			continue
		}
		n := t.Elements()
		p.Total += n
		if t.Layer >= c.NumHiddenLayers {
			p.MTP += n
			continue
		}
		if t.Role == RoleRoutedExpert {
			routed += n
		}
	}
	p.Main = p.Total - p.MTP
	p.RoutedExpert = 3 * int64(c.HiddenSize) * int64(c.MoEIntermediateSize)
	moeLayers := int64(c.NumHiddenLayers - c.FirstKDenseReplace)
	p.Active = p.Main - routed + moeLayers*int64(c.NumExpertsPerTok)*p.RoutedExpert
	p.ActiveNonEmbedding = p.Active - 2*int64(c.VocabSize)*int64(c.HiddenSize)
	return p
}

// BytesByDType sums stored bytes per dtype.
func (c *Config) BytesByDType() map[DType]int64 {
	m := map[DType]int64{}
	for _, t := range c.Tensors() {
		m[t.DType] += t.Bytes()
	}
	return m
}

// ParseLayerIndex extracts L from "model.layers.L.…"; ok is false for model-level names.
func ParseLayerIndex(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, "model.layers.")
	if !ok {
		return 0, false
	}
	dot := strings.IndexByte(rest, '.')
	if dot <= 0 {
		return 0, false
	}
	n := 0
	for _, ch := range rest[:dot] {
		if ch < '0' || ch > '9' {
			return 0, false
		}
		n = n*10 + int(ch-'0')
	}
	return n, true
}

package model

import (
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"
)

// TensorSource makes backend tensors by checkpoint name. LoadWeights reads
// them from a checkpoint; benchmarks generate random ones on the device.
type TensorSource interface {
	// Tensor makes a plain tensor: a norm, bias, embedding table or router.
	Tensor(name string) (*kernels.Tensor, error)
	// Linear makes module.weight, with its scale when the module is FP8.
	Linear(module string) (*kernels.Tensor, error)
}

// Includes reports whether a stage with selection s holds tensor t.
func (s Selection) Includes(c *Config, t TensorSpec) bool {
	switch {
	case t.Layer < 0:
		return (t.Role == RoleEmbedding && (s.Embedding || s.MTP)) ||
			((t.Role == RoleFinalNorm || t.Role == RoleLMHead) && s.LMHead)
	case t.Layer >= c.NumHiddenLayers:
		return s.MTP && (t.Expert < 0 || s.Expert == nil || s.Expert(t.Layer, t.Expert))
	case t.Layer < s.FirstLayer || t.Layer >= s.EndLayer:
		return false
	}
	return t.Expert < 0 || s.Expert == nil || s.Expert(t.Layer, t.Expert)
}

// Assemble builds a stage's Weights from src, asking for exactly the tensors
// the selection includes, by their checkpoint names.
func Assemble(c *Config, sel Selection, src TensorSource) (*Weights, error) {
	w := &Weights{Config: c, Selection: sel}
	var err error
	if sel.Embedding || sel.MTP {
		if w.Embed, err = src.Tensor("model.embed_tokens.weight"); err != nil {
			return nil, err
		}
	}
	if sel.LMHead {
		if w.FinalNorm, err = src.Tensor("model.norm.weight"); err != nil {
			return nil, err
		}
		if w.LMHead, err = src.Linear("lm_head"); err != nil {
			return nil, err
		}
	}
	for i := sel.FirstLayer; i < sel.EndLayer; i++ {
		lw, err := assembleLayer(c, i, sel, src)
		if err != nil {
			return nil, err
		}
		w.Layers = append(w.Layers, lw)
	}
	if sel.MTP {
		if w.MTP, err = assembleLayer(c, c.NumHiddenLayers, sel, src); err != nil {
			return nil, err
		}
	}
	return w, nil
}

func assembleLayer(c *Config, i int, sel Selection, src TensorSource) (*LayerWeights, error) {
	p := fmt.Sprintf("model.layers.%d.", i)
	lw := &LayerWeights{Index: i, Kind: c.LayerKind(i)}
	var errs []error
	get := func(dst **kernels.Tensor, name string) {
		t, err := src.Tensor(p + name)
		errs = append(errs, err)
		*dst = t
	}
	lin := func(dst **kernels.Tensor, module string) {
		t, err := src.Linear(p + module)
		errs = append(errs, err)
		*dst = t
	}
	get(&lw.InputNorm, "input_layernorm.weight")
	get(&lw.PostNorm, "post_attention_layernorm.weight")
	lin(&lw.Q, "self_attn.q_proj")
	lin(&lw.K, "self_attn.k_proj")
	lin(&lw.V, "self_attn.v_proj")
	lin(&lw.O, "self_attn.o_proj")
	if c.AttentionBias {
		get(&lw.QBias, "self_attn.q_proj.bias")
		get(&lw.KBias, "self_attn.k_proj.bias")
		get(&lw.VBias, "self_attn.v_proj.bias")
	}
	if c.UseQKNorm {
		get(&lw.QNorm, "self_attn.q_norm.weight")
		get(&lw.KNorm, "self_attn.k_norm.weight")
	}
	mlp := func(gate, up, down **kernels.Tensor, prefix string) {
		lin(gate, prefix+"gate_proj")
		lin(up, prefix+"up_proj")
		lin(down, prefix+"down_proj")
	}
	if lw.Kind == LayerDense {
		mlp(&lw.Gate, &lw.Up, &lw.Down, "mlp.")
	} else {
		get(&lw.Router, "mlp.gate.weight")
		get(&lw.RouterBias, "mlp.gate.e_score_correction_bias")
		lw.Experts = make([]*kernels.Expert, c.NRoutedExperts)
		for e := range lw.Experts {
			if sel.Expert != nil && !sel.Expert(i, e) {
				continue
			}
			ex := &kernels.Expert{}
			mlp(&ex.Gate, &ex.Up, &ex.Down, fmt.Sprintf("mlp.experts.%d.", e))
			lw.Experts[e] = ex
		}
		if c.NSharedExperts > 0 {
			mlp(&lw.SharedGate, &lw.SharedUp, &lw.SharedDown, "mlp.shared_experts.")
		}
	}
	if lw.Kind == LayerMTP {
		get(&lw.Embed, "embed_tokens.weight")
		get(&lw.ENorm, "enorm.weight")
		get(&lw.HNorm, "hnorm.weight")
		lin(&lw.EHProj, "eh_proj")
		get(&lw.HeadNorm, "shared_head.norm.weight")
		lin(&lw.Head, "shared_head.head")
	}
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	return lw, nil
}

package model

import (
	"fmt"
	"math"

	"github.com/glmtopo/glmtopo/kernels"
)

// Forward holds what GLM-4.5's layer math needs besides weights: the backend
// and the per-step batch. It allocates its activations per call and frees them.
type Forward struct {
	Cfg  *Config
	BE   kernels.Backend
	Meta kernels.BatchMeta
	T    int // tokens in this step
	// Ranks, when set, makes this one rank's forward of layers split over
	// several (parallel/tp): the layer weights are the rank's slices
	// (Shard) and partial sums go through its collectives. nil: one rank.
	Ranks *RankComm

	temps []*kernels.Tensor
	err   error
}

// tmp allocates an F32 activation [T, width] freed by Release.
func (f *Forward) tmp(width int) *kernels.Tensor {
	return f.tmpOf(kernels.F32, f.T, width)
}

func (f *Forward) tmpOf(dt kernels.DType, shape ...int) *kernels.Tensor {
	if f.err != nil {
		return nil
	}
	t, err := f.BE.NewTensor(dt, shape...)
	if err != nil {
		f.err = err
		return nil
	}
	f.temps = append(f.temps, t)
	return t
}

// Release frees the step's activations.
func (f *Forward) Release() {
	for _, t := range f.temps {
		f.BE.Free(t)
	}
	f.temps = nil
}

// do records the first error of a chain of backend calls.
func (f *Forward) do(what string, err error) {
	if err != nil && f.err == nil {
		f.err = fmt.Errorf("%s: %w", what, err)
	}
}

// Layer runs decoder layer lw on the residual stream h [T,H] in place:
// h = h + attn(norm(h)); h = h + mlp(norm(h)).
func (f *Forward) Layer(lw *LayerWeights, h *kernels.Tensor, cache *kernels.KVCache) error {
	c := f.Cfg
	xn := f.tmp(c.HiddenSize)
	if f.err != nil {
		return f.err
	}
	f.do("input norm", f.BE.RMSNorm(xn, h, lw.InputNorm, float32(c.RMSNormEps)))
	o := f.attention(lw, xn, cache)
	f.allReduce(f.Ranks.tp(), o, "o_proj")
	// h += o; xn = norm(h): the post-attention norm fused with the residual add.
	if f.err == nil {
		f.do("post-attention norm", f.BE.AddRMSNorm(h, o, xn, lw.PostNorm, float32(c.RMSNormEps)))
	}
	var m *kernels.Tensor
	if lw.Kind == LayerDense {
		m = f.mlp(xn, lw.Gate, lw.Up, lw.Down)
		f.allReduce(f.Ranks.tp(), m, "mlp")
	} else if f.Ranks != nil && f.Ranks.AllToAll != nil {
		m = f.moeAllToAll(lw, xn) // whole on every rank: no sum follows
	} else {
		m = f.moe(lw, xn)
		f.allReduce(f.Ranks.moe(), m, "moe") // routed and shared partials in one sum
	}
	if f.err == nil {
		f.do("residual add", f.BE.Add(h, h, m))
	}
	if f.err != nil {
		return fmt.Errorf("layer %d: %w", lw.Index, f.err)
	}
	return nil
}

// attention runs the heads lw holds: all of them, or a rank's slice (its
// o_proj output is then a partial sum).
func (f *Forward) attention(lw *LayerWeights, xn *kernels.Tensor, cache *kernels.KVCache) *kernels.Tensor {
	c := f.Cfg
	heads, kvHeads := lw.Q.Shape[0]/c.HeadDim, lw.K.Shape[0]/c.HeadDim
	q, k, v := f.tmp(heads*c.HeadDim), f.tmp(kvHeads*c.HeadDim), f.tmp(kvHeads*c.HeadDim)
	att, o := f.tmp(heads*c.HeadDim), f.tmp(c.HiddenSize)
	if f.err != nil {
		return nil
	}
	fused := false
	if ml, ok := f.BE.(kernels.MultiLinear); ok {
		var err error
		fused, err = ml.LinearMulti([]*kernels.Tensor{q, k, v}, xn, []*kernels.Tensor{lw.Q, lw.K, lw.V}, []*kernels.Tensor{lw.QBias, lw.KBias, lw.VBias})
		f.do("q/k/v_proj", err)
	}
	if !fused {
		f.do("q_proj", f.BE.Linear(q, xn, lw.Q, lw.QBias))
		f.do("k_proj", f.BE.Linear(k, xn, lw.K, lw.KBias))
		f.do("v_proj", f.BE.Linear(v, xn, lw.V, lw.VBias))
	}
	rope := kernels.RopeParams{Heads: heads, HeadDim: c.HeadDim, RotaryDim: c.RotaryDim(), Theta: c.RopeTheta}
	if f.err == nil {
		f.do("qk-norm/rope/kv-write", f.BE.QKNormRopeKV(q, k, v, lw.QNorm, lw.KNorm, float32(c.RMSNormEps), rope, kvHeads, cache, f.Meta))
	}
	ap := kernels.AttentionParams{Heads: heads, KVHeads: kvHeads, HeadDim: c.HeadDim,
		Scale: float32(1 / math.Sqrt(float64(c.HeadDim)))}
	if f.err == nil {
		f.do("attention", f.BE.Attention(att, q, cache, ap, f.Meta))
	}
	if f.err == nil {
		f.do("o_proj", f.BE.Linear(o, att, lw.O, nil))
	}
	return o
}

// mlp is down(silu(gate·x) * up·x).
func (f *Forward) mlp(x, gate, up, down *kernels.Tensor) *kernels.Tensor {
	inter := gate.Shape[0]
	g, u, y := f.tmp(inter), f.tmp(inter), f.tmp(f.Cfg.HiddenSize)
	if f.err != nil {
		return nil
	}
	f.do("gate_proj", f.BE.Linear(g, x, gate, nil))
	f.do("up_proj", f.BE.Linear(u, x, up, nil))
	if f.err == nil {
		f.do("silu", f.BE.SiluMul(g, g, u))
	}
	if f.err == nil {
		f.do("down_proj", f.BE.Linear(y, g, down, nil))
	}
	return y
}

// moe is Σ routed experts + shared expert: on a rank, Σ over the routed
// experts (or slices of them) it holds and serves + its shared-expert slice.
func (f *Forward) moe(lw *LayerWeights, xn *kernels.Tensor) *kernels.Tensor {
	c := f.Cfg
	logits := f.tmp(c.NRoutedExperts)
	ids := f.tmpOf(kernels.I32, f.T, c.NumExpertsPerTok)
	wts := f.tmpOf(kernels.F32, f.T, c.NumExpertsPerTok)
	routed := f.tmp(c.HiddenSize)
	if f.err != nil {
		return nil
	}
	f.do("router", f.BE.Linear(logits, xn, lw.Router, nil))
	rp := kernels.RouterParams{Experts: c.NRoutedExperts, TopK: c.NumExpertsPerTok, Groups: c.NGroup,
		TopKGroups: c.TopKGroup, NormTopK: c.NormTopKProb, Scale: float32(c.RoutedScalingFactor)}
	if f.err == nil {
		f.do("route", f.BE.Route(ids, wts, logits, lw.RouterBias, rp))
	}
	if f.err == nil {
		f.do("replica mask", f.maskReplicas(lw.Index, ids, wts))
	}
	shared := lw.SharedGate != nil && (f.Ranks == nil || f.Ranks.SharedExpert)
	if sm, ok := f.BE.(kernels.SharedExpertMoE); ok && shared && f.err == nil {
		done, err := sm.MoEWithShared(routed, xn, ids, wts, lw.Experts, &kernels.Expert{Gate: lw.SharedGate, Up: lw.SharedUp, Down: lw.SharedDown})
		f.do("experts with shared expert", err)
		if done || f.err != nil {
			return routed
		}
	}
	if f.err == nil {
		f.do("experts", f.BE.MoE(routed, xn, ids, wts, lw.Experts))
	}
	if shared && f.err == nil {
		s := f.mlp(xn, lw.SharedGate, lw.SharedUp, lw.SharedDown)
		if f.err == nil {
			f.do("shared expert", f.BE.Add(routed, routed, s))
		}
	}
	return routed
}

// Embed returns the embeddings of ids [T] (ids < 0 give zero rows).
func (f *Forward) Embed(table *kernels.Tensor, ids []int32) (*kernels.Tensor, error) {
	idt := f.tmpOf(kernels.I32, len(ids))
	h := f.tmp(f.Cfg.HiddenSize)
	if f.err != nil {
		return nil, f.err
	}
	f.do("upload ids", f.BE.Upload(idt, i32Bytes(ids)))
	if f.err == nil {
		f.do("embed", f.BE.Embed(h, table, idt))
	}
	return h, f.err
}

// Head applies the final norm and lm_head: hidden [T,H] → (normed [T,H], logits [T,V]).
func (f *Forward) Head(h, norm, head *kernels.Tensor) (normed, logits *kernels.Tensor, err error) {
	normed = f.tmpOf(kernels.F32, h.Rows(), f.Cfg.HiddenSize)
	logits = f.tmpOf(kernels.F32, h.Rows(), head.Shape[0])
	if f.err != nil {
		return nil, nil, f.err
	}
	f.do("final norm", f.BE.RMSNorm(normed, h, norm, float32(f.Cfg.RMSNormEps)))
	if f.err == nil {
		f.do("lm_head", f.BE.Linear(logits, normed, head, nil))
	}
	return normed, logits, f.err
}

// MTP runs the multi-token-prediction layer: for each token t it combines the
// main model's final (normed) hidden state hPrev[t] with the embedding of the
// next token next[t] (next < 0, used at position 0, gives a zero embedding),
// runs the MTP decoder layer over its own cache, and returns the logits
// predicting the token after next.
func (f *Forward) MTP(mw *LayerWeights, hPrev *kernels.Tensor, next []int32, cache *kernels.KVCache) (*kernels.Tensor, error) {
	x, err := f.MTPHidden(mw, hPrev, next, cache)
	if err != nil {
		return nil, err
	}
	_, logits, err := f.Head(x, mw.HeadNorm, mw.Head)
	return logits, err
}

// MTPHidden is MTP up to the layer's output, before shared_head: the hidden
// state a recursive draft (vLLM's MTP with more than one speculative token)
// feeds back as the next hPrev; Head(x, mw.HeadNorm, mw.Head) gives the logits.
func (f *Forward) MTPHidden(mw *LayerWeights, hPrev *kernels.Tensor, next []int32, cache *kernels.KVCache) (*kernels.Tensor, error) {
	c := f.Cfg
	e, err := f.Embed(mw.Embed, next)
	if err != nil {
		return nil, err
	}
	en, hn := f.tmp(c.HiddenSize), f.tmp(c.HiddenSize)
	cat, x := f.tmp(2*c.HiddenSize), f.tmp(c.HiddenSize)
	if f.err != nil {
		return nil, f.err
	}
	eps := float32(c.RMSNormEps)
	f.do("mtp enorm", f.BE.RMSNorm(en, e, mw.ENorm, eps))
	f.do("mtp hnorm", f.BE.RMSNorm(hn, hPrev, mw.HNorm, eps))
	if f.err == nil {
		f.do("mtp concat", f.BE.Concat(cat, en, hn)) // embedding first, as vLLM and SGLang concatenate
	}
	if f.err == nil {
		f.do("mtp eh_proj", f.BE.Linear(x, cat, mw.EHProj, nil))
	}
	if f.err != nil {
		return nil, f.err
	}
	if err := f.Layer(mw, x, cache); err != nil {
		return nil, err
	}
	return x, nil
}

func i32Bytes(v []int32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		u := uint32(x)
		b[4*i], b[4*i+1], b[4*i+2], b[4*i+3] = byte(u), byte(u>>8), byte(u>>16), byte(u>>24)
	}
	return b
}

// Gather returns rows of x [T,W] as a new [len(rows),W] tensor.
func (f *Forward) Gather(x *kernels.Tensor, rows []int) (*kernels.Tensor, error) {
	ids := make([]int32, len(rows))
	for i, r := range rows {
		ids[i] = int32(r)
	}
	idt := f.tmpOf(kernels.I32, len(ids))
	out := f.tmpOf(kernels.F32, len(rows), x.Cols())
	if f.err != nil {
		return nil, f.err
	}
	f.do("upload rows", f.BE.Upload(idt, i32Bytes(ids)))
	if f.err == nil {
		f.do("gather", f.BE.Embed(out, x, idt)) // a row gather is an embedding lookup into x
	}
	return out, f.err
}

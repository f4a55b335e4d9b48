package topology

import (
	"strings"

	"github.com/glmtopo/glmtopo/model"
)

// weightKind says how a tensor is split over the GPUs of a stage.
type weightKind int

const (
	wAttn      weightKind = iota // q/o projections: split by TP
	wKV                          // k/v projections: split by TP up to the kv heads, replicated beyond
	wAttnRepl                    // q/k norms: replicated
	wNorm                        // layer norms and the final norm: replicated
	wRouter                      // router weight and bias: replicated
	wDense                       // dense MLP: split by TP
	wShared                      // shared expert: split by TP
	wRouted                      // routed experts: split by TP or placed whole by EP
	wEmbedding                   // vocab-parallel embedding
	wLMHead                      // vocab-parallel lm_head
	wMTP                         // MTP projections, embedding copy and head: split by TP
	wMTPRepl                     // MTP norms: replicated
	numWeightKinds
)

// reportKind is the name a weight kind is reported under in PlanResult.Memory.
var reportKind = [numWeightKinds]string{
	wAttn: "attention", wKV: "attention", wAttnRepl: "attention", wNorm: "norm", wRouter: "router",
	wDense: "dense_mlp", wShared: "shared_expert", wRouted: "routed_expert", wEmbedding: "embedding",
	wLMHead: "lm_head", wMTP: "mtp", wMTPRepl: "mtp",
}

// layerWeights sums one decoder layer's stored bytes and parameters by kind.
type layerWeights struct {
	kind   model.LayerKind
	bytes  [numWeightKinds]int64
	params [numWeightKinds]int64 // scales excluded
	// expert holds each routed expert's bytes (weights and scales).
	expert []int64
	// expertParams is one routed expert's parameter count.
	expertParams int64
	// lookup is the part of wMTP that is an embedding table: looked up, not read per step.
	lookup, lookupParams int64
}

// modelWeights is the checkpoint's tensor list reduced to what placement needs.
type modelWeights struct {
	cfg       *model.Config
	layers    []layerWeights // main layers, then the MTP layer
	top       [numWeightKinds]int64
	topParams [numWeightKinds]int64
	byDType   map[string]int64
	fp8       bool
}

func classify(cfg *model.Config, t model.TensorSpec) weightKind {
	switch t.Role {
	case model.RoleEmbedding:
		return wEmbedding
	case model.RoleLMHead:
		return wLMHead
	case model.RoleFinalNorm, model.RoleNorm:
		return wNorm
	case model.RoleAttention:
		switch {
		case strings.Contains(t.Name, ".k_proj.") || strings.Contains(t.Name, ".v_proj."):
			return wKV
		case len(t.Shape) == 1 && t.Shape[0] == int64(cfg.HeadDim) && strings.Contains(t.Name, "_norm"):
			return wAttnRepl
		}
		return wAttn
	case model.RoleDenseMLP:
		return wDense
	case model.RoleRouter:
		return wRouter
	case model.RoleSharedExpert:
		return wShared
	case model.RoleRoutedExpert:
		return wRouted
	case model.RoleMTP:
		if len(t.Shape) == 1 {
			return wMTPRepl
		}
		return wMTP
	}
	return wNorm
}

func newModelWeights(cfg *model.Config) *modelWeights {
	w := &modelWeights{cfg: cfg, layers: make([]layerWeights, cfg.NumLayers()), byDType: map[string]int64{}}
	w.fp8 = cfg.Quantization != nil && cfg.Quantization.Scheme != model.QuantNone
	for i := range w.layers {
		w.layers[i].kind = cfg.LayerKind(i)
		if w.layers[i].kind != model.LayerDense {
			w.layers[i].expert = make([]int64, cfg.NRoutedExperts)
		}
	}
	for _, t := range cfg.Tensors() {
		k := classify(cfg, t)
		b := t.Bytes()
		w.byDType[string(t.DType)] += b
		var p int64
		if t.ScaleOf == "" {
			p = t.Elements()
		}
		if t.Layer < 0 || t.Layer >= len(w.layers) {
			w.top[k] += b
			w.topParams[k] += p
			continue
		}
		lw := &w.layers[t.Layer]
		lw.bytes[k] += b
		lw.params[k] += p
		if k == wMTP && strings.HasSuffix(t.Name, ".embed_tokens.weight") {
			lw.lookup += b
			lw.lookupParams += p
		}
		if k == wRouted && t.Expert >= 0 && t.Expert < len(lw.expert) {
			lw.expert[t.Expert] += b
			if t.Expert == 0 {
				lw.expertParams += p
			}
		}
	}
	return w
}

// total is every stored byte of the checkpoint.
func (w *modelWeights) total() int64 {
	var s int64
	for _, b := range w.top {
		s += b
	}
	for i := range w.layers {
		for _, b := range w.layers[i].bytes {
			s += b
		}
	}
	return s
}

// shardDiv is the divisor of a kind's bytes on one GPU of an n-GPU stage
// (1 means replicated). Routed experts are handled by the caller.
func (w *modelWeights) shardDiv(k weightKind, n int) int64 {
	switch k {
	case wAttn, wDense, wShared, wEmbedding, wLMHead, wMTP:
		return int64(n)
	case wKV:
		return int64(min(n, w.cfg.NumKeyValueHeads))
	}
	return 1
}

// layerGPUBytes adds layer l's bytes on one GPU to out (by kind). experts is
// the GPU's list of routed experts for EP, or nil for TP (a 1/n slice of all).
func (w *modelWeights) layerGPUBytes(out *[numWeightKinds]int64, l, n int, experts []int) {
	lw := &w.layers[l]
	for k := weightKind(0); k < numWeightKinds; k++ {
		if k == wRouted {
			continue
		}
		out[k] += lw.bytes[k] / w.shardDiv(k, n)
	}
	if lw.kind == model.LayerDense {
		return
	}
	if experts == nil {
		out[wRouted] += lw.bytes[wRouted] / int64(n)
		return
	}
	for _, e := range experts {
		out[wRouted] += lw.expert[e]
	}
}

// kvBytesPerToken is one layer's KV cache per token on one GPU of an n-GPU
// stage: kv heads are split by TP and replicated when TP exceeds them.
func (w *modelWeights) kvBytesPerToken(n, elem int) int64 {
	heads := w.cfg.NumKeyValueHeads
	local := max(heads/n, 1)
	return int64(2 * local * w.cfg.HeadDim * elem)
}

// nonExpertParams is layer l's per-token GEMM parameters on one GPU of an
// n-GPU stage, routed experts excluded.
func (w *modelWeights) nonExpertParams(l, n int) float64 {
	lw := &w.layers[l]
	var p float64
	for _, k := range []weightKind{wAttn, wKV, wDense, wShared, wRouter, wMTP} {
		p += float64(lw.params[k]) / float64(w.shardDiv(k, n))
	}
	return p - float64(lw.lookupParams)/float64(n)
}

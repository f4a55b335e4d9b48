package step

import (
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
)

// layerBytes is what one layer must read besides its routed experts.
func layerBytes(lw *model.LayerWeights) (attn, dense, router, shared int64) {
	attn = tensorBytes(lw.InputNorm, lw.PostNorm, lw.Q, lw.K, lw.V, lw.O, lw.QBias, lw.KBias, lw.VBias, lw.QNorm, lw.KNorm)
	dense = tensorBytes(lw.Gate, lw.Up, lw.Down)
	router = tensorBytes(lw.Router, lw.RouterBias)
	shared = tensorBytes(lw.SharedGate, lw.SharedUp, lw.SharedDown)
	return
}

func expertBytes(lw *model.LayerWeights) int64 {
	for _, e := range lw.Experts {
		if e != nil {
			return tensorBytes(e.Gate, e.Up, e.Down)
		}
	}
	return 0
}

// floorBytes adds up the bytes a step must read: every layer's attention,
// dense MLP or router + shared expert + the distinct routed experts touched,
// the KV cache of every sequence, the embedding rows and lm_head.
func (b *bench) floorBytes(tokens int, kvTokens int64, headRows int, touched []int) (int64, map[string]int64) {
	c := b.cfg
	parts := map[string]int64{}
	moe := 0
	for _, lw := range b.w.Layers {
		a, d, r, s := layerBytes(lw)
		parts["attention"] += a
		parts["dense_mlp"] += d
		parts["router"] += r
		parts["shared_expert"] += s
		if lw.Kind != model.LayerDense && moe < len(touched) {
			parts["routed_experts"] += int64(touched[moe]) * expertBytes(lw)
			moe++
		}
	}
	parts["kv_cache"] = kvTokens * int64(len(b.w.Layers)) * 2 * int64(c.KVDim()) * int64(b.kvElem)
	parts["embedding_rows"] = int64(tokens) * int64(c.HiddenSize) * int64(b.w.Embed.DType.Size())
	parts["lm_head"] = tensorBytes(b.w.LMHead, b.w.FinalNorm)
	_ = headRows
	var total int64
	for _, v := range parts {
		total += v
	}
	return total, parts
}

// flops counts the matrix work of a step: every projection at its token
// count (lm_head at headRows), the experts at top-k per token, and causal
// attention (QKᵀ and PV) over each token's context.
func (b *bench) flops(tokens int, attnPairs int64, headRows int) float64 {
	c := b.cfg
	T := float64(tokens)
	var f float64
	mat := func(rows float64, n, k int) float64 { return 2 * rows * float64(n) * float64(k) }
	for _, lw := range b.w.Layers {
		for _, w := range []interface{ Elements() int }{lw.Q, lw.K, lw.V, lw.O} {
			f += 2 * T * float64(w.Elements())
		}
		f += 4 * float64(attnPairs) * float64(c.NumAttentionHeads*c.HeadDim)
		if lw.Kind == model.LayerDense {
			f += mat(T, 3*c.IntermediateSize, c.HiddenSize)
			continue
		}
		f += mat(T, c.NRoutedExperts, c.HiddenSize)
		f += mat(T, 3*c.MoEIntermediateSize*c.NSharedExperts, c.HiddenSize)
		f += mat(T*float64(c.NumExpertsPerTok), 3*c.MoEIntermediateSize, c.HiddenSize)
	}
	f += mat(float64(headRows), c.VocabSize, c.HiddenSize)
	return f
}

func (b *bench) decode(B int) (Result, error) {
	ctxLen := b.o.Context
	bt := b.batch(B, ctxLen, 1)
	rows := make([]int, B)
	for i := range rows {
		rows[i] = i
	}
	touched, err := b.touched(bt, rows)
	if err != nil {
		return Result{}, err
	}
	if err := b.profile(fmt.Sprintf("decode batch %d context %d", B, ctxLen), bt, rows); err != nil {
		return Result{}, err
	}
	dev, wall, err := b.timeSteps(bt, rows, b.o.Warmup, b.o.Iters)
	if err != nil {
		return Result{}, err
	}
	kvTokens := int64(B) * int64(ctxLen+1)
	bytes, parts := b.floorBytes(B, kvTokens, B, touched)
	r := Result{Phase: "decode", Batch: B, Context: ctxLen, Tokens: B, StepSeconds: dev, EagerSeconds: dev, WallSeconds: wall,
		Bytes: bytes, FLOPs: b.flops(B, kvTokens, B), Breakdown: parts, DistinctExperts: mean(touched)}
	if b.o.Graph {
		gs, err := b.timeGraph(bt, b.o.Iters)
		if err != nil {
			return r, fmt.Errorf("cuda graph: %w", err)
		}
		r.GraphSeconds = gs
		r.StepSeconds = min(dev, gs)
	}
	r.routes = b.routes
	if b.o.TP == 1 {
		if r.OneRank, err = b.oneRank(bt, rows, b.o.Warmup, b.o.Iters); err != nil { // tp.go
			return r, fmt.Errorf("one-rank communicator: %w", err)
		}
	}
	return r, nil
}

func (b *bench) prefill(P int) (Result, error) {
	bt := b.batch(1, 0, P)
	rows := []int{P - 1}
	touched, err := b.touched(bt, rows)
	if err != nil {
		return Result{}, err
	}
	iters := max(1, min(b.o.Iters, 3))
	fmt.Fprintf(b.log, "bench step: prefill %d tokens (%d timed steps)\n", P, iters)
	if err := b.profile(fmt.Sprintf("prefill %d", P), bt, rows); err != nil {
		return Result{}, err
	}
	dev, wall, err := b.timeSteps(bt, rows, 1, iters)
	if err != nil {
		return Result{}, err
	}
	pairs := int64(P) * int64(P+1) / 2
	bytes, parts := b.floorBytes(P, int64(P), 1, touched)
	r := Result{Phase: "prefill", Batch: 1, Context: 0, Tokens: P, StepSeconds: dev, EagerSeconds: dev, WallSeconds: wall,
		Bytes: bytes, FLOPs: b.flops(P, pairs, 1), Breakdown: parts, DistinctExperts: mean(touched)}
	return r, nil
}

func mean(v []int) float64 {
	if len(v) == 0 {
		return 0
	}
	var s int
	for _, x := range v {
		s += x
	}
	return float64(s) / float64(len(v))
}

// tensorBytes is what reading t (and its scale) costs.
func tensorBytes(ts ...*kernels.Tensor) int64 {
	var n int64
	for _, t := range ts {
		if t == nil {
			continue
		}
		n += int64(t.Elements() * t.DType.Size())
		if t.Scale != nil {
			n += int64(t.Scale.Elements() * t.Scale.DType.Size())
		}
	}
	return n
}

package step

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
)

// Speculative decoding's step (--speculative-tokens N), timed as the engine
// runs it (parallel/spec_step.go): the verify step, the main model over
// B×(N+1) rows, each row a one-token view of its sequence (the decode
// kernels, replayed from a CUDA graph like a decode step of B×(N+1)
// sequences); then the MTP layer's draft passes, eagerly: one over the
// step's accepted positions (timed at its most, N+1 rows per sequence),
// N−1 recursive ones over B rows, each with the MTP head on B rows.

// SpecResult compares one batch's speculative step with its plain decode step.
type SpecResult struct {
	Batch         int     `json:"batch"`
	Drafts        int     `json:"speculative_tokens"`
	DecodeSeconds float64 `json:"decode_step_s"` // plain decode, best of eager and graph
	VerifySeconds float64 `json:"verify_step_s"` // the main model over B×(N+1) rows, best of eager and graph
	VerifyEager   float64 `json:"verify_eager_s"`
	VerifyGraph   float64 `json:"verify_graph_s,omitempty"`
	DraftSeconds  float64 `json:"draft_s"`    // the MTP layer's passes (eager)
	StepRatio     float64 `json:"step_ratio"` // (verify + draft) / decode at the layers built
	// FullDepthRatio scales the main model's time to the model's full depth
	// (the MTP layer stays one layer): the ratio the served model sees.
	FullDepthRatio float64          `json:"full_depth_step_ratio"`
	Projected      []SpecProjection `json:"projected"`
}

// SpecProjection is the throughput at an acceptance rate per draft position.
type SpecProjection struct {
	Acceptance      float64 `json:"acceptance"`
	TokensPerStep   float64 `json:"tokens_per_step"` // per sequence: 1 + α + … + α^N
	TokensPerS      float64 `json:"tokens_per_s"`
	PlainTokensPerS float64 `json:"plain_tokens_per_s"`
	Speedup         float64 `json:"speedup"`            // at the layers built
	FullDepthSpeed  float64 `json:"full_depth_speedup"` // at the model's full depth
}

// SpecAcceptances are the acceptance rates the report projects.
var SpecAcceptances = []float64{0.6, 0.8, 0.9}

// TokensPerStep is the expected tokens a sequence gains per verify step with
// n drafts each accepted with probability a (given the previous ones were).
func TokensPerStep(a float64, n int) float64 {
	t, p := 0.0, 1.0
	for range n + 1 {
		t += p
		p *= a
	}
	return t
}

// specBatch lays out nseq sequences of cached tokens whose next rows+1
// positions are one-token views (one batch sequence per row).
func (b *bench) specBatch(nseq, cached, rows int) (*kernels.Batch, error) {
	bs := b.o.BlockSize
	per := (cached + rows + bs - 1) / bs
	if have := b.caches[0].K.Shape[0] / bs; nseq*per > have {
		return nil, fmt.Errorf("verify step: %d sequences × %d blocks exceed the %d cached blocks (lower --context or --batch)", nseq, per, have)
	}
	bt := &kernels.Batch{}
	for s := range nseq {
		table := make([]int32, per)
		for i := range table {
			table[i] = int32(s*per + i)
		}
		for j := range rows {
			pos := cached + j
			bt.Positions = append(bt.Positions, int32(pos))
			bt.SeqIndex = append(bt.SeqIndex, int32(len(bt.BlockTables)))
			bt.Slots = append(bt.Slots, table[pos/bs]*int32(bs)+int32(pos%bs))
			bt.BlockTables = append(bt.BlockTables, table)
			bt.ContextLens = append(bt.ContextLens, int32(pos+1))
		}
	}
	return bt, nil
}

// verify times batch B's speculative step beside decode, its plain step.
func (b *bench) verify(B int, decode Result) (SpecResult, error) {
	N := b.o.SpecTokens
	r := SpecResult{Batch: B, Drafts: N, DecodeSeconds: decode.StepSeconds}
	bt, err := b.specBatch(B, b.o.Context, N+1)
	if err != nil {
		return r, err
	}
	all := make([]int, bt.Tokens())
	for i := range all {
		all[i] = i
	}
	if r.VerifyEager, _, err = b.timeSteps(bt, all, b.o.Warmup, b.o.Iters); err != nil {
		return r, err
	}
	r.VerifySeconds = r.VerifyEager
	if b.o.Graph {
		if r.VerifyGraph, err = b.timeGraph(bt, b.o.Iters); err != nil {
			return r, fmt.Errorf("cuda graph: %w", err)
		}
		r.VerifySeconds = min(r.VerifySeconds, r.VerifyGraph)
	}
	if r.DraftSeconds, err = b.timeDraft(B); err != nil {
		return r, fmt.Errorf("mtp draft: %w", err)
	}
	r.StepRatio = (r.VerifySeconds + r.DraftSeconds) / r.DecodeSeconds
	depth := float64(b.fullLayers) / float64(b.cfg.NumHiddenLayers)
	r.FullDepthRatio = (r.VerifySeconds*depth + r.DraftSeconds) / (r.DecodeSeconds * depth)
	for _, a := range SpecAcceptances {
		tps := TokensPerStep(a, N)
		p := SpecProjection{Acceptance: a, TokensPerStep: tps, PlainTokensPerS: float64(B) / r.DecodeSeconds,
			TokensPerS: float64(B) * tps / (r.VerifySeconds + r.DraftSeconds)}
		p.Speedup = p.TokensPerS / p.PlainTokensPerS
		p.FullDepthSpeed = tps / r.FullDepthRatio
		r.Projected = append(r.Projected, p)
	}
	return r, nil
}

// timeDraft times the MTP layer's passes of one speculative step of B
// sequences (eagerly, as the engine runs them).
func (b *bench) timeDraft(B int) (float64, error) {
	N := b.o.SpecTokens
	first, err := b.specBatch(B, b.o.Context, N+1)
	if err != nil {
		return 0, err
	}
	later := make([]*kernels.Batch, 0, N-1)
	for d := 1; d < N; d++ {
		bt, err := b.specBatch(B, b.o.Context+d, 1)
		if err != nil {
			return 0, err
		}
		later = append(later, bt)
	}
	last := make([]int, B) // each sequence's last row of the first pass
	for i := range last {
		last[i] = i*(N+1) + N
	}
	dev, _, err := b.timeRuns(b.o.Warmup, b.o.Iters, func() ([]*model.Forward, error) {
		var fs []*model.Forward
		f, err := b.mtpPass(first, last)
		fs = append(fs, f)
		for _, bt := range later {
			if err != nil {
				break
			}
			f, err = b.mtpPass(bt, nil)
			fs = append(fs, f)
		}
		return fs, err
	})
	return dev, err
}

// mtpPass runs the MTP layer over bt's rows (random hidden states and
// tokens) and its head and an argmax on rows (nil: all).
func (b *bench) mtpPass(bt *kernels.Batch, rows []int) (*model.Forward, error) {
	T := bt.Tokens()
	meta, err := b.be.UploadBatch(bt)
	if err != nil {
		return nil, err
	}
	f := &model.Forward{Cfg: b.cfg, BE: b.be, Meta: meta, T: T}
	ids := make([]int32, T)
	for i := range ids {
		ids[i] = int32(b.rng.IntN(b.cfg.VocabSize))
	}
	hPrev, err := b.be.NewTensor(kernels.F32, T, b.cfg.HiddenSize)
	if err != nil {
		return f, err
	}
	defer b.be.Free(hPrev) // stream-ordered, as the step's other frees
	if err := b.be.Fill(hPrev, uint64(T), 1); err != nil {
		return f, err
	}
	x, err := f.MTPHidden(b.w.MTP, hPrev, ids, b.mtpCache)
	if err != nil {
		return f, err
	}
	return f, b.headArgmax(f, x, rows, b.w.MTP.HeadNorm, b.w.MTP.Head)
}

// makeMTPCache allocates the MTP layer's paged K/V like the main layers'.
func (b *bench) makeMTPCache() error {
	c0 := b.caches[0]
	k, err := b.be.NewTensor(c0.K.DType, c0.K.Shape...)
	if err != nil {
		return fmt.Errorf("mtp kv cache: %w", err)
	}
	v, err := b.be.NewTensor(c0.V.DType, c0.V.Shape...)
	if err != nil {
		b.be.Free(k)
		return fmt.Errorf("mtp kv cache: %w", err)
	}
	b.mtpCache = &kernels.KVCache{K: k, V: v, BlockSize: c0.BlockSize, KVHeads: c0.KVHeads, HeadDim: c0.HeadDim}
	return nil
}

func (b *bench) freeMTPCache() {
	if b.mtpCache != nil {
		b.be.Free(b.mtpCache.K)
		b.be.Free(b.mtpCache.V)
		b.mtpCache = nil
	}
}

// runSpec times every batch's speculative step (after its decode step).
func (b *bench) runSpec(rep *Report, log io.Writer) error {
	if b.o.SpecTokens == 0 {
		return nil
	}
	full, err := modelDepth(b.o.Model)
	if err != nil {
		return err
	}
	b.fullLayers = full
	if err := b.makeMTPCache(); err != nil {
		return err
	}
	defer b.freeMTPCache()
	for _, d := range rep.Results {
		if d.Phase != "decode" {
			continue
		}
		t0 := time.Now()
		r, err := b.verify(d.Batch, d)
		if err != nil {
			return fmt.Errorf("verify batch %d: %w", d.Batch, err)
		}
		rep.Speculative = append(rep.Speculative, r)
		fmt.Fprintf(log, "bench step: verify batch %d × %d rows: %.3f ms + draft %.3f ms vs decode %.3f ms (%.2f×; %.1fs)\n",
			d.Batch, b.o.SpecTokens+1, r.VerifySeconds*1e3, r.DraftSeconds*1e3, r.DecodeSeconds*1e3, r.StepRatio, time.Since(t0).Seconds())
	}
	return nil
}

// modelDepth is the uncut model's decoder layers.
func modelDepth(name string) (int, error) {
	var cfg *model.Config
	var err error
	if p, ok := strings.CutPrefix(name, "synth:"); ok {
		cfg, err = model.Preset(p)
	} else {
		cfg, err = model.LoadConfig(name)
	}
	if err != nil {
		return 0, err
	}
	return cfg.NumHiddenLayers, nil
}

func printSpecTable(w io.Writer, r *Report) {
	if len(r.Speculative) == 0 {
		return
	}
	fmt.Fprintf(w, "\nMTP speculative step (%d drafts; verify = main model over batch × %d rows, draft = MTP layer passes, eager)\n",
		r.Speculative[0].Drafts, r.Speculative[0].Drafts+1)
	fmt.Fprintf(w, "%6s %10s %10s %10s %10s %8s %10s", "batch", "decode ms", "verify ms", "v.graph", "draft ms", "ratio", "full-depth")
	for _, a := range SpecAcceptances {
		fmt.Fprintf(w, "  tok/s@%.1f speedup", a)
	}
	fmt.Fprintln(w)
	for _, x := range r.Speculative {
		fmt.Fprintf(w, "%6d %10.3f %10.3f %10.3f %10.3f %7.2f× %9.2f×", x.Batch, x.DecodeSeconds*1e3, x.VerifyEager*1e3,
			x.VerifyGraph*1e3, x.DraftSeconds*1e3, x.StepRatio, x.FullDepthRatio)
		for _, p := range x.Projected {
			fmt.Fprintf(w, "  %9.0f %6.2f×", p.TokensPerS, p.FullDepthSpeed)
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintln(w, "(tok/s at the layers built; speedup at the model's full depth, the MTP layer one layer beside it)")
}

// Package step is `glmtopo bench step`: it times prefill and decode steps of
// GLM-4.5-shaped layers on one GPU and prints each beside its floor, the
// bytes the step must read over the HBM read bandwidth (and, for prefill,
// the FLOPs over the GEMM throughput) measured by the same run on the same GPU.
//
// --tensor-parallel-size N adds each decode batch's floor on N GPUs of a
// tensor-parallel stage (tp.go, rankfloor.go): the bytes the busiest GPU
// reads over the HBM rate plus the all-reduces at the rate `glmtopo bench
// collective --json` measured (--collective-json) or the catalog's. N = 1
// also times every decode step through a one-rank NCCL communicator against
// the plain path. N > 1 is predicted, not timed: that needs N GPUs and the
// multi-GPU stage; the run still times the single-GPU steps it predicts
// from, or without a GPU prints the floor alone. --floor-only builds and
// times nothing (no GPU needed). Neither is an error: both exit 0.
package step

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/model"

	"github.com/glmtopo/glmtopo/internal/cliflag"
)

// Options are the command's flags.
type Options struct {
	Model      string
	Layers     int
	Batches    []int
	Context    int
	Prefill    int
	Iters      int
	Warmup     int
	JSON       bool
	Device     int
	BlockSize  int
	KVDType    string
	FastGemm   bool // bf16 activations in cuBLAS GEMMs (the flag defaults to true; false: hi+lo halves)
	NoFlash    bool // per-q-head prefill attention instead of attention_flash
	BlockGemv  bool // narrow GEMVs on the block kernels instead of the streamed ones
	ExactFP8   bool // e4m3 GEMVs read hi+lo f16 activation planes
	NoPDL      bool // launch kernels without programmatic dependent launch
	NoWideGemv bool // e4m3 Linear layers of up to 64 tokens on the streamed kernel
	WideMin    int  // narrowest e4m3 Linear batch on the wide kernel (0: the backend's default)
	LoadFormat string
	Profile    bool
	Graph      bool
	// SpecTokens, when positive, also times the MTP speculative step with
	// that many drafts (spec.go).
	SpecTokens int
	// CalibrationOut, when set, receives the measured HBM and GEMM efficiencies
	// for `glmtopo plan --calibration` (merged into an existing file).
	CalibrationOut string
	// Tensor-parallel floor and the one-rank communicator path (tp.go).
	TP             int  // --tensor-parallel-size; 0: not asked
	ExpertParallel bool // --enable-expert-parallel
	CollectiveJSON string
	FloorOnly      bool
	GPU            string // catalog GPU for a floor without a device
}

// Report is the --json output.
type Report struct {
	Device        string   `json:"device"`
	Model         string   `json:"model"`
	Layers        int      `json:"layers"`
	Dense         int      `json:"dense_layers"`
	WeightBytes   int64    `json:"weight_bytes"`
	ReadBW        float64  `json:"hbm_read_bytes_per_s"`
	GemmFLOPS     float64  `json:"gemm_bf16_flop_per_s"`
	KVDType       string   `json:"kv_dtype"`
	WideGemm      string   `json:"wide_gemm"`
	PrefillAttn   string   `json:"prefill_attention"`
	NarrowGemv    string   `json:"narrow_gemv"`
	Results       []Result `json:"results"`
	CommandLine   string   `json:"command_line"`
	ElapsedSecond float64  `json:"elapsed_s"`

	Speculative []SpecResult `json:"speculative,omitempty"` // --speculative-tokens (spec.go)
	// TensorParallel is --tensor-parallel-size's floor on N GPUs and, with
	// N = 1, the one-rank communicator's timings (tp.go).
	TensorParallel *TPReport `json:"tensor_parallel,omitempty"`
}

// Result is one timed phase.
type Result struct {
	Phase           string           `json:"phase"` // decode or prefill
	Batch           int              `json:"batch"`
	Context         int              `json:"context"`
	Tokens          int              `json:"tokens"`
	StepSeconds     float64          `json:"step_s"` // median device time per step (events), the better of eager and graph
	EagerSeconds    float64          `json:"eager_step_s"`
	GraphSeconds    float64          `json:"graph_step_s,omitempty"` // median device time of a CUDA-graph replay
	WallSeconds     float64          `json:"wall_s"`                 // median host time per step, synchronised
	Bytes           int64            `json:"floor_bytes"`
	FLOPs           float64          `json:"flops"`
	BytesFloor      float64          `json:"bytes_floor_s"`
	FLOPsFloor      float64          `json:"flops_floor_s"`
	Efficiency      float64          `json:"efficiency"` // max(floor) / step
	DistinctExperts float64          `json:"distinct_experts_per_moe_layer"`
	Breakdown       map[string]int64 `json:"floor_bytes_by_part"`
	// OneRank times the step again through a one-rank communicator
	// (--tensor-parallel-size 1, decode only; tp.go).
	OneRank *OneRankResult `json:"one_rank,omitempty"`

	routes [][]int // per MoE layer, the distinct experts the step routed to
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("bad batch size %q", f)
		}
		out = append(out, n)
	}
	return out, nil
}

// Run parses args (without the command name) and runs the benchmark.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("bench step", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o Options
	var batches string
	fs.StringVar(&o.Model, "model", "synth:glm-4.5-air", "model directory (config.json) or synth:PRESET[-fp8]")
	fs.IntVar(&o.Layers, "layers", 4, "decoder layers to build (the first N of the model)")
	fs.StringVar(&batches, "batch", "1,16,64", "decode batch sizes (sequences)")
	fs.IntVar(&o.Context, "context", 4096, "tokens already in each sequence's KV cache for decode")
	fs.IntVar(&o.Prefill, "prefill", 8192, "prompt tokens for the prefill step (0: skip)")
	fs.IntVar(&o.Iters, "iters", 10, "timed steps per phase")
	fs.IntVar(&o.Warmup, "warmup", 3, "untimed steps per phase")
	fs.BoolVar(&o.JSON, "json", false, "print a JSON report instead of a table")
	fs.IntVar(&o.Device, "device", 0, "CUDA device ordinal")
	fs.IntVar(&o.BlockSize, "block-size", 16, "KV cache block size (tokens)")
	fs.StringVar(&o.KVDType, "kv-cache-dtype", "bf16", "KV cache dtype: bf16, f32, or fp8 (fp8_e4m3)")
	fs.BoolVar(&o.FastGemm, "fast-gemm", true, "round activations to bf16 once in cuBLAS GEMMs, as vLLM and SGLang run (false: two bf16 halves, ~f32 accuracy, twice the FLOPs)")
	fs.BoolVar(&o.NoFlash, "no-flash-attention", false, "run bf16-cache prefill attention per q head (the kernel before attention_flash)")
	fs.BoolVar(&o.BlockGemv, "block-gemv", false, "run narrow-batch GEMVs on the block tensor-core kernels (before the streamed ones)")
	fs.BoolVar(&o.NoWideGemv, "no-wide-gemv", false, "run e4m3 Linear layers of up to 64 tokens on the streamed kernel (16 tokens per pass) instead of the wide one")
	fs.IntVar(&o.WideMin, "wide-gemv-min-tokens", 0, "narrowest e4m3 Linear batch the wide kernel takes (0: default, 17)")
	fs.BoolVar(&o.NoPDL, "no-pdl", false, "launch kernels without programmatic dependent launch (Hopper: each kernel may start while its predecessor drains)")
	fs.BoolVar(&o.ExactFP8, "exact-fp8-activations", false, "e4m3 GEMVs read activations as two f16 planes (~22 bits) instead of one (11 bits)")
	fs.StringVar(&o.LoadFormat, "load-format", "dummy", "weights: dummy (random, made on the GPU)")
	fs.BoolVar(&o.Profile, "profile", false, "also time every operation of one step of each phase (to stderr)")
	fs.BoolVar(&o.Graph, "cuda-graph", true, "also time decode steps replayed from a captured CUDA graph")
	fs.IntVar(&o.SpecTokens, "speculative-tokens", 0, "also time the MTP speculative step with N drafts (1..4): verify and draft beside decode, tokens/s at acceptance 0.6/0.8/0.9")
	fs.StringVar(&o.CalibrationOut, "calibration-out", "", "write the efficiencies the engine achieved to this calibration file (for glmtopo plan --calibration)")
	addTPFlags(fs, &o)
	if err := cliflag.Parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("bench step: unexpected arguments %q", fs.Args())
	}
	var err error
	if o.Batches, err = parseInts(batches); err != nil {
		return err
	}
	if o.LoadFormat != "dummy" {
		return fmt.Errorf("bench step: --load-format %q: only dummy is supported", o.LoadFormat)
	}
	if o.SpecTokens < 0 || o.SpecTokens > 4 {
		return fmt.Errorf("bench step: --speculative-tokens %d: want 0 (off) to 4", o.SpecTokens)
	}
	if o.Layers <= 0 || o.Context < 0 || o.Prefill < 0 || o.Iters <= 0 || o.BlockSize <= 0 {
		return fmt.Errorf("bench step: --layers, --iters and --block-size must be positive, --context and --prefill not negative")
	}
	if err := o.checkTP(); err != nil {
		return err
	}
	run := run
	if o.FloorOnly {
		run = runFloorOnly // tp.go
	}
	rep, err := run(ctx, o, stderr)
	if errors.Is(err, cuda.ErrNoCUDA) && o.TP > 1 {
		// N GPUs are predicted, not timed, anyway: without a GPU print the floor.
		fmt.Fprintf(stderr, "bench step: %v: printing the floor on %d GPUs only (--floor-only)\n", err, o.TP)
		o.FloorOnly = true
		rep, err = runFloorOnly(ctx, o, stderr)
	}
	if err != nil {
		return err
	}
	rep.CommandLine = "glmtopo bench step " + strings.Join(args, " ")
	if o.JSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	if !o.FloorOnly {
		printTable(stdout, rep)
		printSpecTable(stdout, rep)
	}
	printTPTable(stdout, rep)
	return nil
}

func loadConfig(name string, layers int) (*model.Config, error) {
	var cfg *model.Config
	var err error
	if p, ok := strings.CutPrefix(name, "synth:"); ok {
		cfg, err = model.Preset(p)
	} else {
		cfg, err = model.LoadConfig(name)
	}
	if err != nil {
		return nil, err
	}
	if layers > cfg.NumHiddenLayers {
		return nil, fmt.Errorf("bench step: --layers %d but the model has %d", layers, cfg.NumHiddenLayers)
	}
	return cfg.WithLayers(layers)
}

func printTable(w io.Writer, r *Report) {
	fmt.Fprintf(w, "device %s | model %s, %d layers (%d dense), weights %.2f GiB | KV %s | wide GEMM %s\n",
		r.Device, r.Model, r.Layers, r.Dense, float64(r.WeightBytes)/(1<<30), r.KVDType, r.WideGemm)
	fmt.Fprintf(w, "measured: HBM read %.0f GB/s, bf16 GEMM %.0f TFLOP/s\n", r.ReadBW/1e9, r.GemmFLOPS/1e12)
	fmt.Fprintf(w, "%-8s %6s %8s %8s %10s %10s %10s %10s %10s %8s %9s\n", "phase", "batch", "context", "tokens",
		"eager ms", "graph ms", "wall ms", "floor ms", "GB read", "% floor", "experts")
	for _, x := range r.Results {
		floor := max(x.BytesFloor, x.FLOPsFloor)
		fmt.Fprintf(w, "%-8s %6d %8d %8d %10.3f %10.3f %10.3f %10.3f %10.2f %7.1f%% %9.1f\n", x.Phase, x.Batch, x.Context, x.Tokens,
			x.EagerSeconds*1e3, x.GraphSeconds*1e3, x.WallSeconds*1e3, floor*1e3, float64(x.Bytes)/1e9, 100*x.Efficiency, x.DistinctExperts)
	}
}

// bench holds the built model on the GPU.
type bench struct {
	o      Options
	be     *cuda.Backend
	cfg    *model.Config
	w      *model.Weights
	caches []*kernels.KVCache
	kvElem int
	rng    *rand.Rand
	log    io.Writer
	prof   *profiler
	// graphTemps live as long as a captured graph.
	graphTemps []*kernels.Tensor
	// The MTP layer's cache and the uncut model's depth (spec.go).
	mtpCache   *kernels.KVCache
	fullLayers int
	// ranks, when set, is the communicator the layers sum through; tp and
	// ar are --tensor-parallel-size's report and all-reduce rate (tp.go).
	ranks *model.RankComm
	tp    *TPReport
	ar    allReduceRate
	// routes are the distinct experts of each MoE layer of the last
	// touched step.
	routes [][]int
}

// profile runs one step of bt through the per-operation profiler.
func (b *bench) profile(title string, bt *kernels.Batch, lastRows []int) error {
	if !b.o.Profile {
		return nil
	}
	tm, err := b.be.NewTimer()
	if err != nil {
		return err
	}
	defer tm.Close()
	b.prof = &profiler{Backend: b.be, tm: tm, total: map[string]float64{}, calls: map[string]int{}}
	defer func() { b.prof = nil }()
	f, err := b.step(bt, lastRows)
	if f != nil {
		defer f.Release()
	}
	if err != nil {
		return err
	}
	if err := b.be.Sync(); err != nil {
		return err
	}
	b.prof.print(b.log, title)
	return nil
}

func run(ctx context.Context, o Options, log io.Writer) (*Report, error) {
	start := time.Now()
	cfg, err := loadConfig(o.Model, o.Layers)
	if err != nil {
		return nil, err
	}
	be, err := cuda.New(cuda.Options{Device: o.Device, FastWideGemm: o.FastGemm, NoFlashAttention: o.NoFlash, BlockGemv: o.BlockGemv,
		ExactFP8Activations: o.ExactFP8, NoPDL: o.NoPDL, NoWideGemv: o.NoWideGemv, WideGemvMinTokens: o.WideMin})
	if err != nil {
		return nil, err
	}
	defer be.Close()
	b := &bench{o: o, be: be, cfg: cfg, rng: rand.New(rand.NewPCG(1, 2)), log: log}
	rep := &Report{Device: be.DeviceName(), Model: o.Model, Layers: cfg.NumHiddenLayers, Dense: cfg.FirstKDenseReplace,
		KVDType: o.KVDType, WideGemm: "bf16x2 (hi+lo split)", PrefillAttn: "flash (per GQA group)",
		NarrowGemv: "streamed (per warp)"}
	if o.BlockGemv {
		rep.NarrowGemv = "block (8 warps split K)"
	}
	if o.ExactFP8 {
		rep.NarrowGemv += ", e4m3 with hi+lo f16 activations"
	}
	if o.FastGemm {
		rep.WideGemm = "bf16"
	}
	if o.NoFlash {
		rep.PrefillAttn = "per q head"
	}
	fmt.Fprintf(log, "bench step: measuring HBM read bandwidth and GEMM throughput on %s\n", be.DeviceName())
	if rep.ReadBW, err = be.ReadBandwidth(4<<30, 10); err != nil {
		return nil, fmt.Errorf("read bandwidth: %w", err)
	}
	if rep.GemmFLOPS, err = be.GemmFLOPS(8192, 8192, 8192, 10); err != nil {
		return nil, fmt.Errorf("gemm throughput: %w", err)
	}
	if o.TP > 0 { // the floor's rates, before anything is timed (tp.go)
		if b.tp, b.ar, err = newTPReport(o, be.DeviceName(), uint64(be.MemoryBytes()), rep.ReadBW); err != nil {
			return nil, err
		}
	}
	fmt.Fprintf(log, "bench step: making %d layers of %s weights on the GPU\n", cfg.NumHiddenLayers, o.Model)
	// Every layer, the embedding, final norm and lm_head; the MTP layer with --speculative-tokens.
	w, freeWeights, err := model.DummyWeights(cfg, model.Selection{EndLayer: cfg.NumHiddenLayers, Embedding: true, LMHead: true,
		MTP: o.SpecTokens > 0 && cfg.HasMTP()}, be, 0)
	if err != nil {
		return nil, err
	}
	defer freeWeights()
	b.w = w
	rep.WeightBytes = w.Bytes
	if err := b.makeCaches(); err != nil {
		return nil, err
	}
	defer func() {
		for _, c := range b.caches {
			be.Free(c.K)
			be.Free(c.V)
		}
	}()
	if err := be.Sync(); err != nil {
		return nil, err
	}
	for _, B := range o.Batches {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		r, err := b.decode(B)
		if err != nil {
			return nil, fmt.Errorf("decode batch %d: %w", B, err)
		}
		r.BytesFloor = float64(r.Bytes) / rep.ReadBW
		r.FLOPsFloor = r.FLOPs / rep.GemmFLOPS
		r.Efficiency = max(r.BytesFloor, r.FLOPsFloor) / r.StepSeconds
		rep.Results = append(rep.Results, r)
		fmt.Fprintf(log, "bench step: decode batch %d: %.3f ms (floor %.3f ms)\n", B, r.StepSeconds*1e3, r.BytesFloor*1e3)
	}
	if err := b.runSpec(rep, log); err != nil { // spec.go
		return nil, err
	}
	if err := b.tensorParallel(rep, log); err != nil { // tp.go
		return nil, err
	}
	if o.Prefill > 0 {
		r, err := b.prefill(o.Prefill)
		if err != nil {
			return nil, fmt.Errorf("prefill %d: %w", o.Prefill, err)
		}
		r.BytesFloor = float64(r.Bytes) / rep.ReadBW
		r.FLOPsFloor = r.FLOPs / rep.GemmFLOPS
		r.Efficiency = max(r.BytesFloor, r.FLOPsFloor) / r.StepSeconds
		rep.Results = append(rep.Results, r)
	}
	rep.ElapsedSecond = time.Since(start).Seconds()
	if o.CalibrationOut != "" {
		hbm, gemm := engineRates(rep)
		if err := writeCalibration(o.CalibrationOut, be.DeviceName(), uint64(be.MemoryBytes()), hbm, gemm); err != nil {
			return nil, err
		}
		fmt.Fprintf(log, "bench step: wrote the engine's achieved efficiencies to %s\n", o.CalibrationOut)
	}
	return rep, nil
}

// makeCaches allocates each layer's paged K/V for the largest phase and
// fills them with random values (decode reads a full context of them).
func (b *bench) makeCaches() error {
	c := b.cfg
	maxB := 0
	for _, B := range b.o.Batches {
		maxB = max(maxB, B)
	}
	bs := b.o.BlockSize
	blocks := max(maxB*((b.o.Context+1+bs-1)/bs), (b.o.Prefill+bs-1)/bs)
	dt, err := kernels.ParseKVCacheDType(b.o.KVDType, kernels.BF16)
	if err != nil {
		return err
	}
	b.kvElem = dt.Size()
	need := int64(c.NumHiddenLayers) * 2 * int64(blocks*bs) * int64(c.KVDim()) * int64(dt.Size())
	fmt.Fprintf(b.log, "bench step: KV cache %d blocks × %d layers, %.2f GiB\n", blocks, c.NumHiddenLayers, float64(need)/(1<<30))
	for range c.NumHiddenLayers {
		k, err := b.be.NewTensor(dt, blocks*bs, c.NumKeyValueHeads, c.HeadDim)
		if err != nil {
			return fmt.Errorf("kv cache (%.1f GiB for all layers; lower --layers, --batch or --context): %w", float64(need)/(1<<30), err)
		}
		v, err := b.be.NewTensor(dt, blocks*bs, c.NumKeyValueHeads, c.HeadDim)
		if err != nil {
			b.be.Free(k)
			return fmt.Errorf("kv cache (%.1f GiB for all layers; lower --layers, --batch or --context): %w", float64(need)/(1<<30), err)
		}
		b.caches = append(b.caches, &kernels.KVCache{K: k, V: v, BlockSize: bs, KVHeads: c.NumKeyValueHeads, HeadDim: c.HeadDim})
		if err := b.be.Fill(k, uint64(len(b.caches)*2), 1); err != nil {
			return err
		}
		if err := b.be.Fill(v, uint64(len(b.caches)*2+1), 1); err != nil {
			return err
		}
	}
	return nil
}

// batch lays out nseq sequences of `cached` cached tokens plus `tokens` new ones each.
func (b *bench) batch(nseq, cached, tokens int) *kernels.Batch {
	bs := b.o.BlockSize
	per := (cached + tokens + bs - 1) / bs
	bt := &kernels.Batch{}
	for s := 0; s < nseq; s++ {
		table := make([]int32, per)
		for i := range table {
			table[i] = int32(s*per + i)
		}
		for j := 0; j < tokens; j++ {
			pos := cached + j
			bt.Positions = append(bt.Positions, int32(pos))
			bt.SeqIndex = append(bt.SeqIndex, int32(s))
			bt.Slots = append(bt.Slots, table[pos/bs]*int32(bs)+int32(pos%bs))
		}
		bt.BlockTables = append(bt.BlockTables, table)
		bt.ContextLens = append(bt.ContextLens, int32(cached+tokens))
	}
	return bt
}

// step runs one forward step (embedding, layers, final norm, lm_head on the
// last token of each sequence, argmax) and leaves it queued on the stream.
func (b *bench) step(bt *kernels.Batch, lastRows []int) (*model.Forward, error) {
	ids := make([]int32, bt.Tokens())
	for i := range ids {
		ids[i] = int32(b.rng.IntN(b.cfg.VocabSize))
	}
	meta, err := b.be.UploadBatch(bt)
	if err != nil {
		return nil, err
	}
	var be kernels.Backend = b.be
	if b.prof != nil {
		be = b.prof
	}
	f := &model.Forward{Cfg: b.cfg, BE: be, Meta: meta, T: len(ids), Ranks: b.ranks}
	h, err := f.Embed(b.w.Embed, ids)
	if err != nil {
		return f, err
	}
	for i, lw := range b.w.Layers {
		if err := f.Layer(lw, h, b.caches[i]); err != nil {
			return f, err
		}
	}
	rows := lastRows
	if len(lastRows) == len(ids) {
		rows = nil
	}
	return f, b.headArgmax(f, h, rows, b.w.FinalNorm, b.w.LMHead)
}

// headArgmax gathers rows of x (nil: every row), runs a head (norm, then
// the vocabulary projection) on them and an argmax over its logits, as a
// step's greedy sampling does.
func (b *bench) headArgmax(f *model.Forward, x *kernels.Tensor, rows []int, norm, head *kernels.Tensor) error {
	var err error
	if rows != nil {
		if x, err = f.Gather(x, rows); err != nil {
			return err
		}
	}
	_, logits, err := f.Head(x, norm, head)
	if err != nil {
		return err
	}
	out, err := b.be.NewTensor(kernels.I32, logits.Rows())
	if err != nil {
		return err
	}
	defer b.be.Free(out)
	return b.be.Argmax(out, logits)
}

// graphStep issues one decode step with no host traffic (embedding from
// ids already on the device), for capture.
func (b *bench) graphStep(meta kernels.BatchMeta, ids, out *kernels.Tensor) (*model.Forward, error) {
	T := ids.Elements()
	f := &model.Forward{Cfg: b.cfg, BE: b.be, Meta: meta, T: T, Ranks: b.ranks}
	h, err := b.be.NewTensor(kernels.F32, T, b.cfg.HiddenSize)
	if err != nil {
		return f, err
	}
	b.graphTemps = append(b.graphTemps, h)
	if err := b.be.Embed(h, b.w.Embed, ids); err != nil {
		return f, err
	}
	for i, lw := range b.w.Layers {
		if err := f.Layer(lw, h, b.caches[i]); err != nil {
			return f, err
		}
	}
	_, logits, err := f.Head(h, b.w.FinalNorm, b.w.LMHead)
	if err != nil {
		return f, err
	}
	return f, b.be.Argmax(out, logits)
}

// touched runs one untimed step and counts, per MoE layer, the distinct experts routed to.
func (b *bench) touched(bt *kernels.Batch, lastRows []int) ([]int, error) {
	var counts []int
	b.routes = nil
	b.be.RouteObserver = func(ids []int32, experts int) {
		seen := make(map[int32]bool, experts)
		var distinct []int
		for _, id := range ids {
			if !seen[id] {
				distinct = append(distinct, int(id))
			}
			seen[id] = true
		}
		counts = append(counts, len(seen))
		b.routes = append(b.routes, distinct)
	}
	defer func() { b.be.RouteObserver = nil }()
	f, err := b.step(bt, lastRows)
	if f != nil {
		defer f.Release()
	}
	if err != nil {
		return nil, err
	}
	return counts, b.be.Sync()
}

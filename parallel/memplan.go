package parallel

import (
	"context"
	"fmt"
	"log/slog"
	"sort"
	"strings"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/topology"
)

// Profile, then size (vLLM's --gpu-memory-utilization semantics).
//
// NewEngine sizes the step workspace from a dry forward of the worst-case
// step (its layout, without kernels or memory), allocates it, and on a
// backend with device memory (kernels.MemoryManager) runs steps for real
// over a temporary KV cache, measuring the allocator's peak beyond the
// workspace: the backend's scratch. Not only the largest step: a backend's
// kernels change with the token count (kernels.StepPaths) and a narrower
// step's path can take more scratch than the widest one's (an FP8 Linear
// of 128 tokens expands its weight to bf16 where 64 tokens stream it), so
// the profile runs every path's widest and narrowest step (profileTokens)
// and keeps the peak. The allocator's cache is then trimmed and the
// runtime (what the device holds outside the allocator) is what the
// driver counts as used beyond the allocator's bytes. The KV cache gets
// what topology.MemoryPlan.Size leaves of the budget, in whole blocks (the
// same arithmetic `glmtopo plan` predicts with). After the cache and the
// decode graphs exist, the profiled steps run once more (warm-up: the
// backend's scratch is cached again) and the allocator is capped at the
// budget, so that a step past what was profiled fails with a sentence
// instead of running the GPU out of memory.

// MemoryPlan is the memory plan the KV cache was sized by.
func (e *Engine) MemoryPlan() topology.MemoryPlan { return e.plan }

// MaxStepTokens is the most tokens one step may hold (the workspace's
// size; 0: unbounded, the backend cannot view tensors).
func (e *Engine) MaxStepTokens() int {
	if e.ws == nil {
		return 0
	}
	return e.ws.maxTokens
}

// MaxStepSeqs is the most sequences one step's head was sized for (0: unbounded).
func (e *Engine) MaxStepSeqs() int {
	if e.ws == nil {
		return 0
	}
	return e.ws.maxRows
}

// MaxModelLen is the longest sequence the engine was sized for.
func (e *Engine) MaxModelLen() int { return e.maxModelLen }

// DriverAllocsAfterWarmUp counts the backend's device allocations since
// warm-up ended (decode graphs captured on a bucket's first use add theirs;
// eager steps add none); -1 where the backend does not count them.
func (e *Engine) DriverAllocsAfterWarmUp() int64 {
	mm, ok := e.BE.(kernels.MemoryManager)
	if !ok {
		return -1
	}
	return mm.MemoryStats().DriverAllocs - e.warmAllocs
}

// worstCaseLens are the sequence lengths of the largest step allowed:
// one decode token for each of maxSeqs-1 sequences and the rest of the
// token budget as prompts of at most maxLen tokens.
func worstCaseLens(tokens, maxSeqs, maxLen int) []int {
	singles := min(maxSeqs, tokens) - 1
	var lens []int
	for left := tokens - singles; left > 0; {
		l := min(left, maxLen)
		lens = append(lens, l)
		left -= l
	}
	for range singles {
		lens = append(lens, 1)
	}
	return lens
}

// planMemory sizes and allocates the workspace and returns the plan with
// the KV cache's blocks.
func (e *Engine) planMemory(opt EngineOptions, layers int, graphs, lenGiven bool) (plan topology.MemoryPlan, err error) {
	c := e.Cfg
	lens := worstCaseLens(opt.MaxNumBatchedTokens, opt.MaxNumSeqs, opt.MaxModelLen)
	mm, measured := e.BE.(kernels.MemoryManager)
	var before kernels.MemoryStats
	if measured {
		before = mm.MemoryStats()
	}
	plan = topology.MemoryPlan{Utilization: opt.GPUMemoryUtilization, BlockSize: opt.BlockSize,
		KVBlockBytes: int64(layers) * 2 * int64(opt.BlockSize) * int64(c.KVDim()) * int64(kvDType(opt.KVDType).Size()),
		MaxModelLen:  opt.MaxModelLen, MaxNumSeqs: opt.MaxNumSeqs, BatchedTokens: opt.MaxNumBatchedTokens,
		Weights: weightBytes(c), Source: "estimated"}
	if _, ok := e.BE.(kernels.Viewer); ok {
		size, err := e.dryWorkspace(lens)
		if err != nil {
			return plan, err
		}
		if e.ws, err = newWorkspace(e.BE, size, opt.MaxNumBatchedTokens, len(lens)); err != nil {
			return plan, fmt.Errorf("%w: lower --max-num-batched-tokens (%d) or --max-num-seqs (%d)", err, opt.MaxNumBatchedTokens, opt.MaxNumSeqs)
		}
		plan.Workspace = e.ws.size
	}
	plan.Activations = plan.Workspace
	if graphs {
		plan.Graphs = topology.GraphBytes(c, min(opt.GraphMaxSeqs, opt.MaxNumSeqs), opt.MaxModelLen, opt.BlockSize, true)
	}
	explicitBlocks := opt.NumGPUBlocksOverride
	switch {
	case explicitBlocks > 0:
	case opt.NumBlocks > 0:
		explicitBlocks, plan.Source = opt.NumBlocks, "EngineOptions.NumBlocks"
	case opt.MaxTokens > 0:
		explicitBlocks, plan.Source = (opt.MaxTokens+opt.BlockSize-1)/opt.BlockSize, "--kv-cache-tokens"
	case !measured && opt.KVCacheMemoryBytes == 0:
		explicitBlocks, plan.Source = (8192+opt.BlockSize-1)/opt.BlockSize, "default 8192 tokens"
	}
	if !lenGiven {
		plan.MaxModelLen = 1 // any cache holds a request; the length is capped by it below
		defer func() { plan.MaxModelLen = min(c.MaxPositionEmbeddings, max(plan.KVTokens(), 1)) }()
	}
	if measured {
		plan.Weights = before.Live
		plan.Reserve = opt.MemoryReserve
		err = e.sizeOnDevice(&plan, mm, opt, lens, layers, explicitBlocks)
		return plan, err
	}
	if explicitBlocks == 0 {
		return plan, fmt.Errorf("backend %s reports no device memory: give the KV cache's size (--kv-cache-memory-bytes or --num-gpu-blocks-override)", e.BE.Name())
	}
	err = plan.Size(opt.KVCacheMemoryBytes, explicitBlocks)
	return plan, err
}

// sizeOnDevice profiles the worst-case step of lens and sizes plan's KV
// cache from the device's memory (or by the override, checked against it).
func (e *Engine) sizeOnDevice(plan *topology.MemoryPlan, mm kernels.MemoryManager, opt EngineOptions, lens []int, layers, blocks int) error {
	scratch, err := e.profile(opt, lens, layers)
	if err != nil {
		return fmt.Errorf("profiling a %d-token step over %d sequences: %w; lower --max-num-batched-tokens or --max-num-seqs",
			opt.MaxNumBatchedTokens, len(lens), err)
	}
	plan.Activations = plan.Workspace + scratch
	runtime, free, total, err := measureRuntime(e.BE)
	if err != nil {
		return err
	}
	st := mm.MemoryStats()
	plan.Total = total
	plan.Runtime = runtime
	if plan.Source == "estimated" {
		plan.Source = "profiled"
	}
	if err := plan.Size(opt.KVCacheMemoryBytes, blocks); err != nil {
		return err
	}
	// The cache comes out of what is free plus the allocator's cached
	// blocks (it gives them back when the driver refuses).
	if avail := free + st.Cached; plan.KVBytes > avail {
		return fmt.Errorf("the KV cache of %s (%d blocks, sized by %s) does not fit in the %s the GPU has free after weights and activations (another process may hold memory); lower --gpu-memory-utilization or set --kv-cache-memory-bytes",
			gibString(plan.KVBytes), plan.KVBlocks, plan.Source, gibString(avail))
	}
	return nil
}

// dryWorkspace is the workspace the worst-case step takes, from its
// forward over a backend that runs nothing.
func (e *Engine) dryWorkspace(lens []int) (int64, error) {
	w := &workspace{}
	T := 0
	for _, l := range lens {
		T += l
	}
	rows := make([]int, 0, len(lens))
	t := 0
	for _, l := range lens {
		t += l
		rows = append(rows, t-1)
	}
	w.begin()
	f := &model.Forward{Cfg: e.Cfg, BE: arenaBackend{dryBackend{e.BE}, w}, T: T}
	hook := e.OnLayer
	e.OnLayer = nil
	defer func() { e.OnLayer = hook }()
	if _, _, err := e.forward(f, w, make([]int32, T), rows, nil); err != nil {
		return 0, fmt.Errorf("sizing the step workspace: %w", err)
	}
	return w.high, nil
}

// measureRuntime trims the allocator's cache (kernels.MemoryTrimmer) and
// returns what the device holds beyond the allocator's bytes (the CUDA
// context, kernel modules, cuBLAS, instantiated graphs), with the driver's
// free and total memory.
func measureRuntime(be kernels.Backend) (runtime, free, total int64, err error) {
	mm := be.(kernels.MemoryManager)
	if t, ok := be.(kernels.MemoryTrimmer); ok {
		if err := t.TrimMemory(); err != nil {
			return 0, 0, 0, fmt.Errorf("trimming the allocator's cache: %w", err)
		}
	}
	if free, total, err = mm.DeviceMemory(); err != nil {
		return 0, 0, 0, err
	}
	st := mm.MemoryStats()
	return max(total-free-st.Live-st.Cached, 0), free, total, nil
}

// profileTokens are the step sizes the profile runs: one token, the
// largest step, and both sides of every point where the backend's kernels
// change path (kernels.StepPaths), within [1, maxTokens].
func profileTokens(be kernels.Backend, c *model.Config, experts, maxTokens, maxSeqs int) []int {
	set := map[int]bool{1: true, maxTokens: true, min(maxSeqs, maxTokens): true}
	if sp, ok := be.(kernels.StepPaths); ok {
		for _, t := range sp.StepPathTokens(experts, c.NumExpertsPerTok) {
			set[t], set[t+1] = true, true
		}
	}
	var out []int
	for t := range set {
		if t >= 1 && t <= maxTokens {
			out = append(out, t)
		}
	}
	sort.Ints(out)
	return out
}

// profileShapes are the steps the profile runs: for each of profileTokens,
// the mixed step of worstCaseLens (decode rows of up to max-num-seqs
// sequences and prompt tokens) and, where it differs, one prompt of that
// many tokens (chunked by max-model-len).
func (e *Engine) profileShapes(opt EngineOptions) [][]int {
	var out [][]int
	for _, t := range profileTokens(e.BE, e.Cfg, e.presentExperts(), opt.MaxNumBatchedTokens, opt.MaxNumSeqs) {
		mixed := worstCaseLens(t, opt.MaxNumSeqs, opt.MaxModelLen)
		out = append(out, mixed)
		if one := worstCaseLens(t, 1, opt.MaxModelLen); len(one) != len(mixed) {
			out = append(out, one)
		}
	}
	return out
}

// presentExperts is how many routed experts of the first MoE layer this
// engine holds (the MoE kernels' path depends on it), 0 for a dense model.
func (e *Engine) presentExperts() int {
	if e.W == nil {
		return 0
	}
	for _, l := range e.W.Layers {
		n := 0
		for _, x := range l.Experts {
			if x != nil {
				n++
			}
		}
		if n > 0 {
			return n
		}
	}
	return 0
}

// profile runs the profile's steps over a temporary KV cache and returns
// the backend's largest scratch peak beyond the workspace.
func (e *Engine) profile(opt EngineOptions, _ []int, layers int) (int64, error) {
	mm := e.BE.(kernels.MemoryManager)
	shapes := e.profileShapes(opt)
	blocks := 0
	for _, lens := range shapes {
		n := 0
		for _, l := range lens {
			n += (l + opt.BlockSize - 1) / opt.BlockSize
		}
		blocks = max(blocks, n)
	}
	kv, err := NewKVPool(e.BE, opt.KVDType, layers, blocks, opt.BlockSize, e.Cfg.NumKeyValueHeads, e.Cfg.HeadDim)
	if err != nil {
		return 0, err
	}
	defer kv.Close()
	var peak int64
	for _, lens := range shapes {
		mm.ResetPeakMemory()
		base := mm.MemoryStats().Live
		if err := e.runLens(kv, lens); err != nil {
			return 0, fmt.Errorf("a step of %d sequences (%d tokens): %w", len(lens), sumInts(lens), err)
		}
		peak = max(peak, mm.MemoryStats().Peak-base)
	}
	return peak, nil
}

func sumInts(xs []int) int {
	n := 0
	for _, x := range xs {
		n += x
	}
	return n
}

// runLens runs one eager step of sequences of lens tokens over kv (their
// blocks released after) and waits for it.
func (e *Engine) runLens(kv *KVPool, lens []int) error {
	saved, graphs := e.KV, e.graphs
	e.KV, e.graphs = kv, nil
	defer func() { e.KV, e.graphs = saved, graphs }()
	seqs := make([]Seq, len(lens))
	inputs := make([]StepInput, len(lens))
	vocab := max(e.Cfg.VocabSize, 1)
	for i, l := range lens {
		toks := make([]int32, l)
		for j := range toks { // varied ids: the router spreads them over the experts
			toks[j] = int32((uint64(i*l+j+1) * 2654435761) % uint64(vocab))
		}
		inputs[i] = StepInput{Seq: &seqs[i], Tokens: toks}
	}
	defer func() {
		for i := range seqs {
			kv.Release(&seqs[i])
		}
	}()
	hook := e.OnLayer
	e.OnLayer = nil
	defer func() { e.OnLayer = hook }()
	res, err := e.Step(inputs, false)
	if err != nil {
		return err
	}
	defer res.Release()
	// Sampling waits for the step (and surfaces its errors); greedy and
	// nucleus rows both, so that the sampler's scratch is warm too.
	params := make([]kernels.SampleParams, res.Logits.Rows())
	for i := range params {
		if i%2 == 1 {
			params[i] = kernels.SampleParams{Temperature: 1, TopP: 0.9, TopK: 50, U: 0.5}
		}
	}
	_, err = e.BE.Sample(res.Logits, params)
	return err
}

// warmUp reserves the profiled scratch peak (kernels.ScratchReserver: the
// backend's ops carve their scratch from it), measures the runtime, runs
// the profile's steps over the real cache (first-use allocations such as
// batch metadata happen now, not on the serving path) and caps the
// allocator at the budget less the runtime.
func (e *Engine) warmUp(opt EngineOptions) error {
	mm, ok := e.BE.(kernels.MemoryManager)
	if !ok || e.ws == nil {
		return nil
	}
	// The profiled scratch peak, set aside once: the backend's ops carve
	// their scratch from it instead of asking the driver per step.
	if sr, ok := e.BE.(kernels.ScratchReserver); ok && e.plan.Activations > e.plan.Workspace {
		if err := sr.ReserveScratch(e.plan.Activations - e.plan.Workspace); err != nil {
			return err
		}
	}
	runtime, _, total, err := measureRuntime(e.BE)
	if err != nil {
		return err
	}
	for _, lens := range e.profileShapes(opt) {
		need := 0
		for _, l := range lens {
			need += e.KV.BlocksFor(l)
		}
		if need > e.KV.FreeBlocks() {
			continue
		}
		if err := e.runLens(e.KV, lens); err != nil {
			return err
		}
	}
	st := mm.MemoryStats()
	budget := int64(float64(total) * opt.GPUMemoryUtilization)
	mm.SetMemoryLimit(max(budget-runtime, st.Live+st.Cached))
	e.limited = true
	e.warmAllocs = mm.MemoryStats().DriverAllocs
	return nil
}

// logPlan logs the plan, at Info where it was measured on a device.
func (e *Engine) logPlan(log *slog.Logger) {
	level := slog.LevelDebug
	if e.plan.Total > 0 {
		level = slog.LevelInfo
	}
	var sb strings.Builder
	e.plan.Write(&sb)
	for _, line := range strings.Split(strings.TrimSpace(sb.String()), "\n") {
		log.Log(context.Background(), level, line)
	}
}

// kvDType is the cache's element type as sized (F32 when unset).
func kvDType(dt kernels.DType) kernels.DType {
	if dt.Size() == 0 {
		return kernels.F32
	}
	return dt
}

// weightBytes is the checkpoint's tensors' bytes (the estimate where the
// backend does not count its memory).
func weightBytes(c *model.Config) int64 {
	var n int64
	for _, t := range c.Tensors() {
		n += t.Bytes()
	}
	return n
}

// gibString writes bytes in GiB, or MiB below one GiB.
func gibString(b int64) string {
	if b < 1<<30 {
		return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
	}
	return fmt.Sprintf("%.2f GiB", float64(b)/(1<<30))
}

// boundScheduler caps a scheduler's limits by what the engine was sized
// for: no step holds more tokens or sequences than the workspace, no
// request is longer than the plan's max-model-len.
func (e *Engine) boundScheduler(opt SchedulerOptions) SchedulerOptions {
	if n := e.MaxStepTokens(); n > 0 && opt.PrefillTokens > n {
		opt.Logger.Warn("--max-num-batched-tokens capped by the engine's step workspace", "asked", opt.PrefillTokens, "engine", n)
		opt.PrefillTokens = n
	}
	if n := e.maxNumSeqs; n > 0 && opt.MaxNumSeqs > n {
		opt.Logger.Warn("--max-num-seqs capped by the engine's step workspace", "asked", opt.MaxNumSeqs, "engine", n)
		opt.MaxNumSeqs = n
	}
	opt.MaxNumSeqs = min(opt.MaxNumSeqs, opt.PrefillTokens) // a step holds one token of each
	if n := e.maxModelLen; n > 0 {
		opt.MaxModelLen = min(opt.MaxModelLen, n)
	}
	return opt
}

// MemoryPlan is the engine's memory plan (for metrics).
func (s *Scheduler) MemoryPlan() topology.MemoryPlan { return s.eng.MemoryPlan() }

// DriverAllocsAfterWarmUp is the engine's (for metrics).
func (s *Scheduler) DriverAllocsAfterWarmUp() int64 { return s.eng.DriverAllocsAfterWarmUp() }

// checkWeightsFit refuses, before loading, weights that cannot fit the
// device's free memory within the utilization budget, with what to change
// instead of the allocator's out-of-memory error halfway through.
func checkWeightsFit(c *model.Config, be kernels.Backend, opt EngineOptions) error {
	mm, ok := be.(kernels.MemoryManager)
	if !ok {
		return nil
	}
	free, total, err := mm.DeviceMemory()
	if err != nil {
		return err
	}
	util := opt.GPUMemoryUtilization
	if util <= 0 || util > 1 {
		util = 0.9
	}
	w := weightBytes(c)
	switch budget := int64(float64(total) * util); {
	case w > free:
		return fmt.Errorf("the model's weights (%s, %d layers) do not fit the %s this GPU has free: use more GPUs (glmtopo plan) or fewer layers (--hf-overrides '{\"num_hidden_layers\": N}')",
			gibString(w), c.NumHiddenLayers, gibString(free))
	case w > budget:
		return fmt.Errorf("the model's weights (%s, %d layers) exceed the %s budget (%s × --gpu-memory-utilization %g): raise --gpu-memory-utilization, use more GPUs (glmtopo plan) or fewer layers (--hf-overrides '{\"num_hidden_layers\": N}')",
			gibString(w), c.NumHiddenLayers, gibString(budget), gibString(total), util)
	}
	return nil
}

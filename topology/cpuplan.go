package topology

import (
	"errors"
	"fmt"
	"io"
	"math"
	"strings"
	"text/tabwriter"

	"github.com/glmtopo/glmtopo/model"
)

// CPUPlanRequest plans the CPU engine: Stages pipeline stages (one daemon
// each) on Machines machines of the calibrated kind, layers split as the
// daemons split them for hosts without GPUs. The serving settings are the
// engine's (`glmtopo serve` / `glmtopo node` defaults where zero).
type CPUPlanRequest struct {
	Model     *model.Config
	ModelName string
	Spec      CPUSpec
	Stages    int // default 1
	// Machines is how many machines the stages are spread over, round
	// robin; 1 (the default) puts every stage on this one, as `make run`
	// does, so they share its cores.
	Machines int
	// MicroBatches in the ring (0: one per stage, the daemons' default).
	MicroBatches        int
	MaxNumSeqs          int // default 256
	MaxNumBatchedTokens int // default 2048: the prefill budget per micro-batch
	MaxModelLen         int // default the model's context
	InputLen, OutputLen int // the request shape of the predictions, default 128 and 32
}

// CPUPlan is what a CPU plan adds to the plan file: the calibration it was
// made with, where its stages run, and the serving benchmark predicted at
// several concurrencies (`glmtopo bench serve --predict-from-plan`
// re-simulates its own shape from these).
type CPUPlan struct {
	Spec         CPUSpec           `json:"spec" yaml:"spec"`
	Machines     []int             `json:"machines" yaml:"machines"` // per stage
	MicroBatches int               `json:"micro_batches" yaml:"micro_batches"`
	Serving      []ServePrediction `json:"serving" yaml:"serving"`
}

func (r CPUPlanRequest) withDefaults() (CPUPlanRequest, error) {
	if r.Model == nil {
		return r, errors.New("cpu plan: no model")
	}
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	def(&r.Stages, 1)
	def(&r.Machines, 1)
	def(&r.MicroBatches, r.Stages)
	def(&r.MaxNumSeqs, 256)
	def(&r.MaxNumBatchedTokens, 2048)
	def(&r.MaxModelLen, r.Model.MaxPositionEmbeddings)
	def(&r.InputLen, 128)
	def(&r.OutputLen, 32)
	if r.ModelName == "" {
		r.ModelName = r.Model.ModelType
	}
	switch {
	case r.Stages < 1 || r.Stages > r.Model.NumHiddenLayers:
		return r, fmt.Errorf("cpu plan: %d stages for %d layers", r.Stages, r.Model.NumHiddenLayers)
	case r.Machines < 1 || r.Machines > r.Stages:
		return r, fmt.Errorf("cpu plan: %d machines for %d stages", r.Machines, r.Stages)
	case r.MicroBatches < 1 || r.MicroBatches > 64:
		return r, fmt.Errorf("cpu plan: micro-batches %d outside 1..64", r.MicroBatches)
	case r.MaxNumSeqs < 1 || r.MaxNumSeqs > 1<<16 || r.MaxNumBatchedTokens < 1:
		return r, fmt.Errorf("cpu plan: max-num-seqs %d, max-num-batched-tokens %d", r.MaxNumSeqs, r.MaxNumBatchedTokens)
	case r.InputLen < 1 || r.OutputLen < 1 || r.MaxModelLen < 1:
		return r, errors.New("cpu plan: input-len, output-len and max-model-len must be positive")
	}
	return r, r.Spec.Validate()
}

func (r CPUPlanRequest) pipeline() *cpuPipeline {
	machines := make([]int, r.Stages)
	for s := range machines {
		machines[s] = s % r.Machines
	}
	return &cpuPipeline{spec: r.Spec, cfg: r.Model, splits: evenSplits(r.Model.NumHiddenLayers, r.Stages),
		machines: machines, micro: r.MicroBatches, budget: r.MaxNumBatchedTokens, maxSeqs: r.MaxNumSeqs}
}

// PlanCPU predicts the CPU engine's decode and serving throughput.
func PlanCPU(req CPUPlanRequest) (*PlanResult, error) {
	req, err := req.withDefaults()
	if err != nil {
		return nil, err
	}
	p := req.pipeline()
	w := newModelWeights(req.Model)
	res := &PlanResult{Model: req.ModelName, ModelHash: req.Model.Hash(), Feasible: true,
		Settings: Settings{MaxModelLen: req.MaxModelLen, MaxNumSeqs: req.MaxNumSeqs, MaxNumBatchedTokens: req.MaxNumBatchedTokens,
			KVCacheDType: "f32", InputLen: req.InputLen, OutputLen: req.OutputLen, ExpertParallel: "off"},
		Hosts: []Host{}, Memory: []GPUMemory{}, Experts: []LayerExperts{}, Alternatives: []Alternative{},
		Weights: WeightsSummary{TotalBytes: w.total(), ByDType: w.byDType},
		CPU:     &CPUPlan{Spec: req.Spec, Machines: p.machines, MicroBatches: req.MicroBatches},
	}
	B := req.MaxNumSeqs
	ctx := float64(req.InputLen) + float64(req.OutputLen)/2
	m := min(req.MicroBatches, B)
	times := p.stageTimes((B+m-1)/m, ctx)
	for s := range times {
		res.Stages = append(res.Stages, Stage{Index: s, Host: fmt.Sprintf("cpu%d", p.machines[s]), GPUs: []int{},
			Layers: [2]int{p.splits[s], p.splits[s+1]}, TP: 1, EP: 1, Embedding: s == 0, LMHead: s == 0,
			MTP: s == 0 && req.Model.HasMTP(), DecodeMs: times[s] * 1e3})
	}
	cycle, why := p.decode(B, ctx)
	var sum float64
	for _, t := range times {
		sum += t
	}
	res.Predicted = Prediction{DecodeTokensPerS: float64(B) / cycle, TPOTMs: cycle * 1e3, TTFTMs: p.prefill(req.InputLen) * 1e3,
		Batch: B, MicroBatches: m, TokensPerStep: 1, StepMs: cycle * 1e3,
		BubbleFrac: math.Max(0, 1-float64(m)*sum/(float64(len(times))*cycle)), Bottleneck: why,
		MaxConcurrency: float64(B), KVTokens: int64(B) * int64(req.MaxModelLen)}
	for c := 1; c <= B; c *= 2 {
		sp, err := p.simulate(ServeShape{Concurrency: c, NumPrompts: max(64, 4*c), InputLen: req.InputLen, OutputLen: req.OutputLen})
		if err != nil {
			return nil, err
		}
		res.CPU.Serving = append(res.CPU.Serving, sp)
	}
	res.Reason = fmt.Sprintf("CPU engine: %d stage(s) on %d machine(s) of %d cores, %d micro-batch(es) in the ring; layers split evenly as the daemons split them",
		req.Stages, req.Machines, req.Spec.Cores, req.MicroBatches)
	return res, nil
}

// PredictServe simulates the serving benchmark shape sh on a CPU plan; cfg
// is the plan's model (its hash must match the plan's).
func PredictServe(plan *PlanResult, cfg *model.Config, sh ServeShape) (ServePrediction, error) {
	p, err := planPipeline(plan, cfg)
	if err != nil {
		return ServePrediction{}, err
	}
	return p.simulate(sh)
}

// planPipeline rebuilds the pipeline a CPU plan file describes.
func planPipeline(plan *PlanResult, cfg *model.Config) (*cpuPipeline, error) {
	if plan == nil || plan.CPU == nil {
		return nil, errors.New("predict: the plan has no CPU section (make it with 'glmtopo plan --cpu-stages N')")
	}
	if cfg == nil {
		return nil, errors.New("predict: no model config")
	}
	if h := cfg.Hash(); plan.ModelHash != "" && h != plan.ModelHash {
		return nil, fmt.Errorf("predict: the plan is for model hash %s, the model given has %s", plan.ModelHash, h)
	}
	if len(plan.Stages) != len(plan.CPU.Machines) {
		return nil, fmt.Errorf("predict: %d stages, %d machines", len(plan.Stages), len(plan.CPU.Machines))
	}
	splits := []int{0}
	for i, s := range plan.Stages {
		if s.Layers[0] != splits[i] {
			return nil, fmt.Errorf("predict: stage %d starts at layer %d, want %d", i, s.Layers[0], splits[i])
		}
		splits = append(splits, s.Layers[1])
	}
	return &cpuPipeline{spec: plan.CPU.Spec, cfg: cfg, splits: splits, machines: plan.CPU.Machines, micro: plan.CPU.MicroBatches,
		budget: plan.Settings.MaxNumBatchedTokens, maxSeqs: plan.Settings.MaxNumSeqs}, nil
}

// writeCPUTable renders a CPU plan.
func (r *PlanResult) writeCPUTable(w io.Writer) error {
	var b strings.Builder
	c := r.CPU
	fmt.Fprintf(&b, "glmtopo plan: %s on the CPU engine — %d stage(s), %d micro-batch(es)\n", r.Model, len(r.Stages), c.MicroBatches)
	fmt.Fprintf(&b, "  cpu: %d cores (%.1f effective); GEMM %.1f GFLOP/s (%.1f per core), GEMV %.1f GB/s, attention %.1f GFLOP/s, op %.1f µs, wake %.0f µs, hop %.0f µs + 3 wakes (measured at load %.2f)\n\n",
		c.Spec.Cores, c.Spec.parallelCores(), c.Spec.GEMMGFLOPS, c.Spec.GEMMCoreGFLOPS, c.Spec.GEMVGBps, c.Spec.AttnGFLOPS, c.Spec.OpOverheadUS, c.Spec.WakeUS, c.Spec.HopLatencyUS, c.Spec.Load)
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "STAGE\tMACHINE\tLAYERS\tHOLDS\tDECODE ms")
	for _, s := range r.Stages {
		fmt.Fprintf(tw, "%d\t%s\t[%d,%d)\t%s\t%.2f\n", s.Index, s.Host, s.Layers[0], s.Layers[1], holds(s), s.DecodeMs)
	}
	tw.Flush()
	p := r.Predicted
	fmt.Fprintf(&b, "\ndecode at %d sequences (context %d+%d/2): %.0f tokens/s, TPOT %.2f ms; TTFT of one %d-token prompt %.1f ms; bound: %s\n",
		p.Batch, r.Settings.InputLen, r.Settings.OutputLen, p.DecodeTokensPerS, p.TPOTMs, r.Settings.InputLen, p.TTFTMs, p.Bottleneck)
	fmt.Fprintf(&b, "\nbench serve (random %d in / %d out, request rate inf):\n", r.Settings.InputLen, r.Settings.OutputLen)
	tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "CONCURRENCY\tPROMPTS\tOUTPUT tok/s\tTOTAL tok/s\tMEAN TTFT ms\tMEAN TPOT ms\t")
	for _, s := range c.Serving {
		fmt.Fprintf(tw, "%d\t%d\t%.0f\t%.0f\t%.1f\t%.2f\t\n", s.Concurrency, s.NumPrompts, s.OutputTokensPerS, s.TotalTokensPerS, s.MeanTTFTMs, s.MeanTPOTMs)
	}
	tw.Flush()
	_, err := io.WriteString(w, b.String())
	return err
}

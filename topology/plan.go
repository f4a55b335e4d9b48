package topology

import (
	"errors"
	"fmt"
	"math"

	"github.com/glmtopo/glmtopo/model"
)

// PlanRequest is what the planner needs: the model, the hosts and the
// serving limits. Zero values take the defaults noted (vLLM's flag names).
type PlanRequest struct {
	Model     *model.Config // required
	ModelName string        // for display; defaults to "glm4_moe"
	Inventory Inventory

	MaxModelLen         int     // --max-model-len, default 8192
	MaxNumSeqs          int     // --max-num-seqs, default 32; the KV cache must hold MaxNumSeqs × MaxModelLen tokens
	MaxNumBatchedTokens int     // --max-num-batched-tokens, default 8192 (prefill chunk, activation peak)
	KVCacheDType        string  // --kv-cache-dtype auto|fp8; auto stores the KV cache in bf16
	GPUMemoryUtil       float64 // --gpu-memory-utilization, default 0.9
	// RuntimeReserve is memory per GPU outside weights, KV, activations and
	// decode graphs that still counts against the utilisation budget: CUDA
	// context, kernel modules, cuBLAS and NCCL workspaces, headroom. 0 means
	// the default 2 GiB; negative means none.
	RuntimeReserve int64

	// ExpertLoad is a routing histogram (--expert-load); nil means uniform.
	ExpertLoad *ExpertLoad
	// RedundantExperts is the number of extra physical experts per MoE layer
	// of an EP stage; 0 or negative means one per GPU when ExpertLoad is
	// given and none otherwise.
	RedundantExperts int
	// ExpertParallel is "auto" (default), "on" (routed experts always placed
	// by EP on multi-GPU stages) or "off" (always split by TP).
	ExpertParallel string

	// MTP speculation: DisableMTP turns it off (and leaves the MTP layer
	// unloaded); otherwise SpeculativeTokens (default 1) drafts per step, each
	// accepted with probability MTPAcceptance (default 0.9).
	DisableMTP        bool
	SpeculativeTokens int
	MTPAcceptance     float64
	// MTPStepRatio, when set, is a measured speculative step's time over the
	// plain decode step's (`glmtopo bench step --speculative-tokens`, its
	// full_depth_step_ratio): the plan's prediction with MTP is then its
	// prediction without MTP × tokens per step / ratio (spec_ratio.go).
	MTPStepRatio float64

	// InputLen and OutputLen are the request shape predictions use
	// (default 1024 and 1024, capped by MaxModelLen).
	InputLen, OutputLen int

	Calibration     *Calibration
	MaxAlternatives int  // default 4
	noSuggestions   bool // set when planning a "what would fit" variant
}

// PlanResult is the plan file the node daemons load.
type PlanResult struct {
	Model     string   `json:"model" yaml:"model"`
	ModelHash string   `json:"model_hash" yaml:"model_hash"`
	Feasible  bool     `json:"feasible" yaml:"feasible"`
	Reason    string   `json:"reason" yaml:"reason"`
	Settings  Settings `json:"settings" yaml:"settings"`
	// Hosts is the inventory the plan was made for.
	Hosts        []Host         `json:"hosts" yaml:"hosts"`
	Stages       []Stage        `json:"stages" yaml:"stages"`
	Memory       []GPUMemory    `json:"memory" yaml:"memory"`
	Experts      []LayerExperts `json:"experts" yaml:"experts"`
	Predicted    Prediction     `json:"predicted" yaml:"predicted"`
	Alternatives []Alternative  `json:"alternatives" yaml:"alternatives"`
	Suggestions  []string       `json:"suggestions,omitempty" yaml:"suggestions,omitempty"`
	// Rejected lists the configurations that cannot run at all, and why.
	Rejected []string       `json:"rejected,omitempty" yaml:"rejected,omitempty"`
	Weights  WeightsSummary `json:"weights" yaml:"weights"`
	// CPU is set on plans for the CPU engine (cpuplan.go).
	CPU *CPUPlan `json:"cpu,omitempty" yaml:"cpu,omitempty"`

	hw []hostHW // resolved hosts, for rendering
}

// Settings echoes the limits the plan was made for.
type Settings struct {
	MaxModelLen          int     `json:"max_model_len" yaml:"max_model_len"`
	MaxNumSeqs           int     `json:"max_num_seqs" yaml:"max_num_seqs"`
	MaxNumBatchedTokens  int     `json:"max_num_batched_tokens" yaml:"max_num_batched_tokens"`
	KVCacheDType         string  `json:"kv_cache_dtype" yaml:"kv_cache_dtype"`
	GPUMemoryUtilization float64 `json:"gpu_memory_utilization" yaml:"gpu_memory_utilization"`
	RuntimeReserveBytes  int64   `json:"runtime_reserve_bytes" yaml:"runtime_reserve_bytes"`
	MTP                  bool    `json:"mtp" yaml:"mtp"`
	SpeculativeTokens    int     `json:"speculative_tokens" yaml:"speculative_tokens"`
	MTPAcceptance        float64 `json:"mtp_acceptance" yaml:"mtp_acceptance"`
	InputLen             int     `json:"input_len" yaml:"input_len"`
	OutputLen            int     `json:"output_len" yaml:"output_len"`
	ExpertParallel       string  `json:"expert_parallel" yaml:"expert_parallel"`
	RedundantExperts     int     `json:"redundant_experts" yaml:"redundant_experts"`
}

// Stage is one pipeline stage: a set of GPUs of one host.
type Stage struct {
	Index int    `json:"index" yaml:"index"`
	Host  string `json:"host" yaml:"host"`
	GPUs  []int  `json:"gpus" yaml:"gpus"` // device indices on the host
	// Layers is [first, end) of the main decoder layers.
	Layers [2]int `json:"layers" yaml:"layers"`
	TP     int    `json:"tp" yaml:"tp"` // attention, dense MLP and shared expert
	EP     int    `json:"ep" yaml:"ep"` // routed experts: EP degree (1: split by TP)
	// Embedding, LMHead and MTP say whether the stage holds the embedding
	// table, the final norm + lm_head, and the MTP layer (index num_hidden_layers).
	Embedding bool `json:"embedding" yaml:"embedding"`
	LMHead    bool `json:"lm_head" yaml:"lm_head"`
	MTP       bool `json:"mtp" yaml:"mtp"`
	// DecodeMs is the stage's predicted time per decode micro-batch.
	DecodeMs float64 `json:"decode_ms" yaml:"decode_ms"`
}

// GPUMemory is one GPU's memory plan in bytes.
type GPUMemory struct {
	Host    string           `json:"host" yaml:"host"`
	GPU     int              `json:"gpu" yaml:"gpu"`
	Stage   int              `json:"stage" yaml:"stage"`
	Total   int64            `json:"total" yaml:"total"`
	Budget  int64            `json:"budget" yaml:"budget"` // Total × utilisation
	Weights map[string]int64 `json:"weights" yaml:"weights"`
	// WeightsTotal sums Weights.
	WeightsTotal int64 `json:"weights_total" yaml:"weights_total"`
	KVCache      int64 `json:"kv_cache" yaml:"kv_cache"` // the KV pool: what is left of the budget
	KVRequired   int64 `json:"kv_required" yaml:"kv_required"`
	Activations  int64 `json:"activations" yaml:"activations"`
	Graphs       int64 `json:"graphs" yaml:"graphs"` // decode graphs' arenas and metadata
	Reserve      int64 `json:"reserve" yaml:"reserve"`
	// Headroom is the budget left after the required KV cache (negative: over).
	Headroom int64 `json:"headroom" yaml:"headroom"`
}

// LayerExperts is one MoE layer's physical expert placement on an EP stage.
type LayerExperts struct {
	Layer int `json:"layer" yaml:"layer"`
	Stage int `json:"stage" yaml:"stage"`
	// GPUs lists, per GPU of the stage (in Stage.GPUs order), the logical
	// experts it holds; an expert on several GPUs is replicated.
	GPUs     [][]int `json:"gpus" yaml:"gpus"`
	Replicas []int   `json:"replicas" yaml:"replicas"` // per logical expert
}

// Prediction is the cost model's answer for the plan.
type Prediction struct {
	DecodeTokensPerS float64 `json:"decode_tokens_per_s" yaml:"decode_tokens_per_s"`
	TPOTMs           float64 `json:"tpot_ms" yaml:"tpot_ms"`
	TTFTMs           float64 `json:"ttft_ms" yaml:"ttft_ms"`
	MaxConcurrency   float64 `json:"max_concurrency" yaml:"max_concurrency"`
	KVTokens         int64   `json:"kv_tokens" yaml:"kv_tokens"`
	Bottleneck       string  `json:"bottleneck" yaml:"bottleneck"`
	// Batch is the decode batch (max-num-seqs), split into MicroBatches.
	Batch         int     `json:"batch" yaml:"batch"`
	MicroBatches  int     `json:"micro_batches" yaml:"micro_batches"`
	TokensPerStep float64 `json:"tokens_per_step" yaml:"tokens_per_step"` // with MTP
	// NoMTPDecodeTokensPerS is the same plan's decode throughput without MTP
	// (the verify step's extra tokens and the draft passes weighed against
	// the accepted tokens); 0 when MTP is off.
	NoMTPDecodeTokensPerS float64 `json:"no_mtp_decode_tokens_per_s,omitempty" yaml:"no_mtp_decode_tokens_per_s,omitempty"`
	StepMs                float64 `json:"step_ms" yaml:"step_ms"` // one cycle of all micro-batches
	BubbleFrac            float64 `json:"bubble_fraction" yaml:"bubble_fraction"`
}

// Alternative is another configuration with its prediction.
type Alternative struct {
	Summary   string     `json:"summary" yaml:"summary"`
	Stages    []Stage    `json:"stages" yaml:"stages"`
	Predicted Prediction `json:"predicted" yaml:"predicted"`
}

// WeightsSummary is the checkpoint's size.
type WeightsSummary struct {
	TotalBytes int64            `json:"total_bytes" yaml:"total_bytes"`
	ByDType    map[string]int64 `json:"by_dtype" yaml:"by_dtype"`
}

func (r PlanRequest) withDefaults() (PlanRequest, error) {
	if r.Model == nil {
		return r, errors.New("plan: no model")
	}
	if r.ModelName == "" {
		r.ModelName = r.Model.ModelType
	}
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	def(&r.MaxModelLen, 8192)
	def(&r.MaxNumSeqs, 32)
	def(&r.MaxNumBatchedTokens, 8192)
	def(&r.InputLen, 1024)
	def(&r.OutputLen, 1024)
	def(&r.SpeculativeTokens, 1)
	def(&r.MaxAlternatives, 4)
	if r.GPUMemoryUtil == 0 {
		r.GPUMemoryUtil = 0.9
	}
	if r.MTPAcceptance == 0 {
		r.MTPAcceptance = 0.9
	}
	switch {
	case r.RuntimeReserve == 0:
		r.RuntimeReserve = 2 << 30
	case r.RuntimeReserve < 0:
		r.RuntimeReserve = 0
	}
	switch r.KVCacheDType {
	case "":
		r.KVCacheDType = "auto"
	case "fp8_e4m3": // vLLM's other name of the same cache
		r.KVCacheDType = "fp8"
	}
	if r.ExpertParallel == "" {
		r.ExpertParallel = "auto"
	}
	switch {
	case r.MaxModelLen < 1 || r.MaxNumSeqs < 1 || r.MaxNumBatchedTokens < 1 || r.InputLen < 1 || r.OutputLen < 1:
		return r, errors.New("plan: max-model-len, max-num-seqs, max-num-batched-tokens, input-len and output-len must be positive")
	case r.MaxNumSeqs > 1<<20 || r.MaxModelLen > 1<<24:
		return r, errors.New("plan: max-model-len or max-num-seqs is implausibly large")
	case r.GPUMemoryUtil <= 0 || r.GPUMemoryUtil > 1:
		return r, fmt.Errorf("plan: gpu-memory-utilization %g is outside (0, 1]", r.GPUMemoryUtil)
	case r.KVCacheDType != "auto" && r.KVCacheDType != "fp8" && r.KVCacheDType != "bf16":
		return r, fmt.Errorf("plan: kv-cache-dtype %q is unknown (auto, bf16, fp8, fp8_e4m3)", r.KVCacheDType)
	case r.ExpertParallel != "auto" && r.ExpertParallel != "on" && r.ExpertParallel != "off":
		return r, fmt.Errorf("plan: expert-parallel %q is unknown (auto, on, off)", r.ExpertParallel)
	case r.MTPAcceptance < 0 || r.MTPAcceptance > 1 || math.IsNaN(r.MTPAcceptance):
		return r, fmt.Errorf("plan: mtp-acceptance %g is outside [0, 1]", r.MTPAcceptance)
	case r.SpeculativeTokens < 0 || r.SpeculativeTokens > 8:
		return r, fmt.Errorf("plan: speculative tokens %d is outside 0..8", r.SpeculativeTokens)
	case r.MTPStepRatio < 0 || r.MTPStepRatio > 20 || math.IsNaN(r.MTPStepRatio):
		return r, fmt.Errorf("plan: mtp-step-ratio %g is outside (0, 20] (0: modelled)", r.MTPStepRatio)
	}
	if !r.Model.HasMTP() {
		r.DisableMTP = true
	}
	if r.InputLen+r.OutputLen > r.MaxModelLen {
		r.InputLen = max(1, min(r.InputLen, r.MaxModelLen/2))
		r.OutputLen = max(1, r.MaxModelLen-r.InputLen)
	}
	if err := r.ExpertLoad.validate(r.Model); err != nil {
		return r, err
	}
	return r, nil
}

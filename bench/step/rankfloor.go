package step

import (
	"fmt"
	"math"

	"github.com/glmtopo/glmtopo/model"
)

// RankFloor is the floor of one decode step of the bench's layers on each
// of GPUs GPUs of a tensor-parallel stage: the bytes the busiest GPU reads
// over the HBM read bandwidth, plus the all-reduces the step must wait for.
type RankFloor struct {
	Batch   int `json:"batch"`
	Context int `json:"context"`
	// BytesPerGPU splits as Report's floor_bytes_by_part does, per GPU:
	// attention (q/k/v/o by heads; the norms whole), dense_mlp and
	// shared_expert by the intermediate dimension, router whole,
	// routed_experts (each split GPUs ways, or whole under expert
	// parallelism: the experts the busiest GPU holds that the batch routes
	// to), kv_cache (the GPU's KV heads), embedding_rows and lm_head
	// vocab-parallel (split GPUs ways, as vLLM's).
	BytesPerGPU int64            `json:"bytes_per_gpu"`
	Breakdown   map[string]int64 `json:"bytes_per_gpu_by_part"`
	// ExpertsPerGPU is the routed experts the busiest GPU reads per MoE
	// layer (mean over the layers); measured says whether they come from
	// the bench's own routing at this batch or from uniform routing.
	ExpertsPerGPU   float64 `json:"routed_experts_per_gpu_per_moe_layer"`
	ExpertsMeasured bool    `json:"routed_experts_measured"`
	HBMSeconds      float64 `json:"hbm_floor_s"`
	// AllReduces of AllReduceBytes each (batch × hidden in bf16): two per
	// layer (after o_proj, after the MLP or MoE) and the vocab-parallel
	// embedding's; none on one GPU.
	AllReduces        int     `json:"all_reduces"`
	AllReduceBytes    int64   `json:"all_reduce_bytes"`
	CollectiveSeconds float64 `json:"collective_floor_s"`
	FloorSeconds      float64 `json:"floor_s"` // hbm_floor_s + collective_floor_s
	// Measured is the step timed on that many GPUs (today one, through the
	// one-rank communicator); nil where the floor is a prediction.
	Measured *RankStep `json:"measured,omitempty"`
}

// RankStep is a measured step beside its floor.
type RankStep struct {
	StepSeconds       float64 `json:"step_s"`
	CollectiveSeconds float64 `json:"collective_s"` // the step with − without the collectives
	CollectiveShare   float64 `json:"collective_share"`
	Efficiency        float64 `json:"efficiency"` // floor_s / step_s
}

// floorSpec is what rankFloor needs besides the config.
type floorSpec struct {
	gpus    int
	ep      bool
	batch   int
	context int
	kvElem  int // bytes per KV cache element
	// routes[m], when set, are the distinct experts the batch routed to in
	// the m-th MoE layer; nil: uniform routing's expectation.
	routes [][]int
	readBW float64 // bytes/s
	ar     allReduceRate
}

// collectiveElem is the bytes per element of the hidden-state all-reduces
// the floor counts: vLLM sums activations in bf16.
const collectiveElem = 2

// shard is one GPU's slices of c's decoder layers split gpus ways (whole
// experts under expert parallelism), checked as the loaders check it.
func shard(c *model.Config, gpus int, ep bool) (*model.Shard, error) {
	sh := &model.Shard{TP: gpus, ExpertTP: gpus}
	if ep {
		sh.ExpertTP = 1
	}
	if err := sh.Validate(c); err != nil {
		hint := ""
		if !ep {
			hint = " (or place the experts whole: --enable-expert-parallel)"
		}
		return nil, fmt.Errorf("--tensor-parallel-size %d: %w%s", gpus, err, hint)
	}
	return sh, nil
}

// rankFloor computes the floor of a decode step of s.batch sequences of
// s.context cached tokens on each of s.gpus GPUs.
func rankFloor(c *model.Config, s floorSpec) (RankFloor, error) {
	if s.gpus < 1 || s.batch < 1 || s.context < 0 || s.readBW <= 0 {
		return RankFloor{}, fmt.Errorf("floor: %d GPUs, batch %d, context %d, read bandwidth %g", s.gpus, s.batch, s.context, s.readBW)
	}
	sh, err := shard(c, s.gpus, s.ep)
	if err != nil {
		return RankFloor{}, err
	}
	r := RankFloor{Batch: s.batch, Context: s.context, Breakdown: map[string]int64{}}
	var experts float64
	moe := 0
	for l := 0; l < c.NumHiddenLayers; l++ {
		var expert int64 // one routed expert's slice
		for _, t := range c.LayerTensors(l) {
			b, err := shardBytes(c, sh, t)
			if err != nil {
				return RankFloor{}, err
			}
			switch t.Role {
			case model.RoleRoutedExpert:
				if t.Expert == 0 {
					expert += b
				}
			case model.RoleNorm:
				r.Breakdown["attention"] += b
			default:
				r.Breakdown[string(t.Role)] += b
			}
		}
		if c.LayerKind(l) == model.LayerDense {
			continue
		}
		var routes []int
		if moe < len(s.routes) {
			routes = s.routes[moe]
		}
		n := expertsOnBusiestGPU(c, s, routes)
		experts += n
		r.Breakdown["routed_experts"] += int64(math.Round(n * float64(expert)))
		moe++
	}
	if moe > 0 {
		r.ExpertsPerGPU = experts / float64(moe)
		r.ExpertsMeasured = len(s.routes) >= moe
	}
	_, _, kv0, kv1 := sh.Heads(c)
	kvTokens := int64(s.batch) * int64(s.context+1)
	r.Breakdown["kv_cache"] = kvTokens * int64(c.NumHiddenLayers) * 2 * int64((kv1-kv0)*c.HeadDim) * int64(s.kvElem)
	// Vocab-parallel: a GPU looks up the rows of its vocabulary slice and
	// holds 1/gpus of lm_head (the final norm whole).
	hidden := int64(c.HiddenSize)
	r.Breakdown["embedding_rows"] = ceilDiv(int64(s.batch), int64(s.gpus)) * hidden * 2
	for _, t := range c.Tensors() {
		switch t.Role {
		case model.RoleLMHead:
			r.Breakdown["lm_head"] += ceilDiv(t.Bytes(), int64(s.gpus))
		case model.RoleFinalNorm:
			r.Breakdown["lm_head"] += t.Bytes()
		}
	}
	for _, v := range r.Breakdown {
		r.BytesPerGPU += v
	}
	r.HBMSeconds = float64(r.BytesPerGPU) / s.readBW
	if s.gpus > 1 {
		r.AllReduces = 2*c.NumHiddenLayers + 1
		r.AllReduceBytes = int64(s.batch) * hidden * collectiveElem
		if s.ar == nil {
			return RankFloor{}, fmt.Errorf("floor: %d GPUs and no all-reduce rate", s.gpus)
		}
		r.CollectiveSeconds = float64(r.AllReduces) * s.ar.Seconds(r.AllReduceBytes)
	}
	r.FloorSeconds = r.HBMSeconds + r.CollectiveSeconds
	return r, nil
}

// expertsOnBusiestGPU is how many routed experts of one MoE layer the GPU
// that reads the most of them reads: every routed expert's slice when they
// are split (no expert parallelism), else those of its contiguous block of
// E/gpus experts (parallel/tp's placement without a plan) the batch routes
// to. Without routes it is uniform routing's expectation, E(1−(1−k/E)^b)
// spread evenly over the blocks under expert parallelism.
func expertsOnBusiestGPU(c *model.Config, s floorSpec, routes []int) float64 {
	E, k := c.NRoutedExperts, c.NumExpertsPerTok
	if routes == nil {
		hit := 1 - math.Pow(1-float64(min(k, E))/float64(E), float64(s.batch))
		if s.ep {
			return float64(E) / float64(s.gpus) * hit
		}
		return float64(E) * hit
	}
	if !s.ep {
		return float64(len(routes))
	}
	per := make([]int, s.gpus)
	for _, e := range routes {
		per[blockOf(e, E, s.gpus)]++
	}
	busiest := 0
	for _, n := range per {
		busiest = max(busiest, n)
	}
	return float64(busiest)
}

// blockOf is the GPU whose block [g·E/n, (g+1)·E/n) holds expert e.
func blockOf(e, E, n int) int {
	for g := range n {
		if e < (g+1)*E/n {
			return g
		}
	}
	return n - 1
}

// shardBytes is the bytes of t one GPU holding sh keeps.
func shardBytes(c *model.Config, sh *model.Shard, t model.TensorSpec) (int64, error) {
	sp, err := sh.SplitOf(c, t)
	if err != nil {
		return 0, err
	}
	if sp.Whole() {
		return t.Bytes(), nil
	}
	return t.Bytes() / t.Shape[sp.Dim] * int64(sp.End-sp.Start), nil
}

func ceilDiv(a, b int64) int64 { return (a + b - 1) / b }

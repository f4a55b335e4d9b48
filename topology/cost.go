package topology

import (
	"math"

	"github.com/glmtopo/glmtopo/model"
)

// stageShape is how one pipeline stage uses its GPUs: n GPUs of one host,
// attention/dense/shared-expert weights split by TP = n, routed experts
// either split by TP too (ep false) or placed whole by expert parallelism
// over the n GPUs (ep true), tokens moved by all-to-all dispatch/combine.
type stageShape struct {
	host int
	n    int
	ep   bool
}

// cost is a time in seconds split by what it is spent on.
type cost struct {
	weights  float64 // reading weights from HBM
	kv       float64 // reading the KV cache from HBM
	compute  float64 // GEMM and attention FLOPs
	comm     float64 // collectives inside the host
	overhead float64 // per-kernel fixed costs
	hop      float64 // pipeline hop to the next stage
}

func (c cost) total() float64 {
	return max(c.weights+c.kv, c.compute) + c.comm + c.overhead + c.hop
}

func (c *cost) add(d cost) {
	c.weights += d.weights
	c.kv += d.kv
	c.compute += d.compute
	c.comm += d.comm
	c.overhead += d.overhead
	c.hop += d.hop
}

// Kernels per layer with CUDA graphs: norms, projections, rope, attention,
// router/top-k, grouped GEMMs, activation, combine.
const (
	kernelsDense = 10
	kernelsMoE   = 14
	kernelsLM    = 3
)

func (p *planner) peakFLOPs(hw *hostHW) float64 {
	tf := hw.gpu.BF16TFLOPS
	if p.w.fp8 && hw.gpu.FP8() {
		tf = hw.gpu.FP8TFLOPS
	}
	return tf * 1e12 * hw.eff.GEMM
}

func (p *planner) hbm(hw *hostHW) float64 { return hw.gpu.HBMGBps * 1e9 * hw.eff.HBM }

// allReduce is a ring all-reduce of bytes over n GPUs of a host.
func (p *planner) allReduce(hw *hostHW, n int, bytes float64) float64 {
	if n <= 1 {
		return 0
	}
	bw, lat := hw.peer()
	if !hw.nvlink {
		bw *= min(1, 4/float64(n)) // beyond 4 GPUs the ring crosses the CPU sockets' shared link
	}
	// Small messages use a one-shot/tree algorithm (latency grows with log n),
	// large ones a ring (bandwidth term).
	return 2*float64(n-1)/float64(n)*bytes/bw + (1+math.Log2(float64(n)))*lat
}

// allToAll moves bytesPerGPU from each GPU to the others. Over NVSwitch every
// GPU sends at full link rate; over PCIe the traffic crosses the shared root
// complex, so a GPU gets about 2/n of its link, and each exchange pays a
// longer setup than a ring step.
func (p *planner) allToAll(hw *hostHW, n int, bytesPerGPU float64) float64 {
	if n <= 1 {
		return 0
	}
	bw, lat := hw.peer()
	if !hw.nvlink {
		bw *= min(1, 2/float64(n))
	}
	return bytesPerGPU/bw + 4*lat
}

// expertsOnGPU returns, for layer l of an EP stage, the expected routed-expert
// bytes read and the share of expert tokens of the busiest GPU at T tokens.
func (p *planner) expertsOnGPU(sh stageShape, l int, T float64) (bytes, share float64) {
	lw := &p.w.layers[l]
	avg := float64(lw.bytes[wRouted]) / float64(len(lw.expert))
	probs := p.probs[l]
	if !sh.ep || sh.n == 1 {
		return p.touchedAll(l, T) * avg / float64(sh.n), 1 / float64(sh.n)
	}
	pl := p.placement(l, sh.n)
	for g, experts := range pl.gpus {
		b := touched(probs, pl.replicas, experts, T) * avg
		bytes = max(bytes, b)
		share = max(share, pl.share[g])
	}
	return bytes, share
}

// touchedAll is Σ_e 1−(1−p_e)^T over all experts of layer l, memoized.
func (p *planner) touchedAll(l int, T float64) float64 {
	key := touchKey{l, T}
	if v, ok := p.touchMemo[key]; ok {
		return v
	}
	E := len(p.probs[l])
	all := make([]int, E)
	for e := range all {
		all[e] = e
	}
	v := touched(p.probs[l], nil, all, T)
	p.touchMemo[key] = v
	return v
}

type touchKey struct {
	layer int
	T     float64
}

// layerCost is layer l on one GPU of stage shape sh for T tokens from b
// sequences whose mean context is ctx tokens.
func (p *planner) layerCost(sh stageShape, l int, T, b, ctx float64) cost {
	hw := &p.hosts[sh.host]
	lw := &p.w.layers[l]
	n := sh.n
	var c cost
	var readBytes float64
	for k := weightKind(0); k < numWeightKinds; k++ {
		if k != wRouted {
			readBytes += float64(lw.bytes[k]) / float64(p.w.shardDiv(k, n))
		}
	}
	readBytes -= float64(lw.lookup) / float64(n)
	flops := 2 * T * p.w.nonExpertParams(l, n)
	kernels := kernelsDense
	H := float64(p.cfg.HiddenSize)
	actBytes := T * H * 2
	if lw.kind != model.LayerDense {
		kernels = kernelsMoE
		eb, share := p.expertsOnGPU(sh, l, T)
		readBytes += eb
		flops += 2 * T * float64(p.cfg.NumExpertsPerTok) * share * float64(lw.expertParams)
	}
	// Attention: QK^T and PV over the context, kv heads local to this GPU.
	flops += 4 * T * ctx * float64(p.cfg.QDim()) / float64(n)
	c.weights = readBytes / p.hbm(hw)
	c.kv = b * ctx * float64(p.w.kvBytesPerToken(n, p.kvElem)) / p.hbm(hw)
	c.compute = flops / p.peakFLOPs(hw)
	c.overhead = float64(kernels) * hw.eff.KernelOverheadUS * 1e-6
	if n > 1 {
		if sh.ep && lw.kind != model.LayerDense {
			// Reduce-scatter after attention and all-gather before the next one
			// (one all-reduce's traffic), then dispatch and combine.
			dispatchElem := 2.0
			if p.w.fp8 && hw.gpu.FP8() {
				dispatchElem = 1
			}
			perGPU := T / float64(n) * float64(p.cfg.NumExpertsPerTok) * float64(n-1) / float64(n) * H
			c.comm = p.allReduce(hw, n, actBytes) + p.allToAll(hw, n, perGPU*dispatchElem) + p.allToAll(hw, n, perGPU*2)
			c.overhead += 4 * hw.eff.KernelOverheadUS * 1e-6
		} else {
			c.comm = 2 * p.allReduce(hw, n, actBytes)
			c.overhead += 2 * hw.eff.KernelOverheadUS * 1e-6
		}
	}
	return c
}

// headCost is the embedding on the first stage (vocab-parallel: one all-reduce).
func (p *planner) headCost(sh stageShape, T float64) cost {
	hw := &p.hosts[sh.host]
	return cost{comm: p.allReduce(hw, sh.n, T*float64(p.cfg.HiddenSize)*2),
		overhead: 2 * hw.eff.KernelOverheadUS * 1e-6}
}

// tailCost is the final norm and lm_head for T tokens, plus, with MTP, the
// draft passes of the MTP layer for b sequences.
func (p *planner) tailCost(sh stageShape, T, b, ctx float64) cost {
	hw := &p.hosts[sh.host]
	var c cost
	c.weights = float64(p.w.top[wLMHead]) / float64(sh.n) / p.hbm(hw)
	c.compute = 2 * T * float64(p.w.topParams[wLMHead]) / float64(sh.n) / p.peakFLOPs(hw)
	c.overhead = kernelsLM * hw.eff.KernelOverheadUS * 1e-6
	for i := 0; i < p.spec; i++ {
		c.add(p.layerCost(sh, p.cfg.NumHiddenLayers, b, b, ctx))
	}
	return c
}

// hopCost is sending T tokens' hidden states and residuals from stage shape
// a to b (over the host's GPU link, or the NICs between hosts).
func (p *planner) hopCost(a, b stageShape, T float64) float64 {
	bytes := T * float64(p.cfg.HiddenSize) * 2 * 2
	ha, hb := &p.hosts[a.host], &p.hosts[b.host]
	if a.host == b.host {
		bw, lat := ha.peer()
		return bytes/bw + lat
	}
	bw := min(nicGBps(ha.nic, ha.eff), nicGBps(hb.nic, hb.eff)) * 1e9
	lat := max(nicLatencyS(ha.nic, ha.eff), nicLatencyS(hb.nic, hb.eff))
	return bytes/bw + lat
}

// activationBytes is the peak activation memory of one GPU for a forward of
// max-num-batched-tokens tokens (memplan.go's ActivationBytes, which the
// engine's profiled step is compared with).
func (p *planner) activationBytes(sh stageShape, tail bool) int64 {
	return ActivationBytes(p.cfg, StepShape{Tokens: p.req.MaxNumBatchedTokens, Seqs: p.req.MaxNumSeqs * (1 + p.spec),
		GPUs: sh.n, EP: sh.ep, Head: tail, FP8: p.w.fp8})
}

// graphBytes is the decode graphs' memory on one GPU (memplan.go's GraphBytes).
func (p *planner) graphBytes(tail bool) int64 {
	return GraphBytes(p.cfg, min(p.req.MaxNumSeqs, 64), p.req.MaxModelLen, 16, tail)
}

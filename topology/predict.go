package topology

import (
	"fmt"
	"math"
	"strings"

	"github.com/glmtopo/glmtopo/model"
)

// predictDecode fills the decode figures of a split candidate: m
// micro-batches of b sequences (T tokens with the MTP drafts) go round the
// pipeline; a cycle lasts as long as the slowest stage times m, or one trip
// through all stages when there are fewer micro-batches than stages.
func (p *planner) predictDecode(c *candidate, m int, b, T float64) {
	S := len(c.shapes)
	times := make([]float64, S)
	var sum, worst float64
	for s, sh := range c.shapes {
		sp := p.stagePrefix(sh, b, T)
		t := sp.time[c.splits[s+1]] - sp.time[c.splits[s]]
		if s == 0 { // the head stage: embedding, and lm_head + MTP drafts (distributed.md)
			t += sp.head.total() + sp.tail.total()
		}
		t += p.ringHop(c, s, T)
		times[s] = t
		sum += t
		worst = max(worst, t)
	}
	cycle := math.Max(sum, float64(m)*worst)
	B := float64(p.req.MaxNumSeqs)
	c.pred = Prediction{
		DecodeTokensPerS: B * p.tau / cycle,
		TPOTMs:           cycle / p.tau * 1e3,
		Batch:            p.req.MaxNumSeqs,
		MicroBatches:     m,
		TokensPerStep:    p.tau,
		StepMs:           cycle * 1e3,
		BubbleFrac:       1 - float64(m)*sum/(float64(S)*cycle),
	}
	c.times = times
}

// finish computes what only reported candidates need: TTFT, KV capacity and
// the bottleneck.
func (p *planner) finish(c *candidate) {
	S := len(c.shapes)
	B := p.req.MaxNumSeqs
	m := min(S, B)
	b := math.Ceil(float64(B) / float64(m))
	T := b * float64(1+p.spec)
	ctx := p.decodeCtx()
	worst := 0
	c.costs = make([]cost, S)
	for s, sh := range c.shapes {
		if c.times[s] > c.times[worst] {
			worst = s
		}
		var cs cost
		for l := c.splits[s]; l < c.splits[s+1]; l++ {
			cs.add(p.layerCost(sh, l, T, b, ctx))
		}
		if s == 0 {
			cs.add(p.headCost(sh, T))
			cs.add(p.tailCost(sh, T, b, ctx))
		}
		cs.hop = p.ringHop(c, s, T)
		c.costs[s] = cs
	}
	var kvTokens int64 = math.MaxInt64
	for s := range c.shapes {
		for _, g := range p.stageMemory(c, s) {
			if perTok := p.stageKVPerToken(c, s); perTok > 0 {
				kvTokens = min(kvTokens, max(0, g.KVCache)/perTok)
			}
		}
	}
	c.pred.KVTokens = kvTokens
	c.pred.MaxConcurrency = math.Floor(float64(kvTokens)/float64(p.req.MaxModelLen)*100) / 100
	c.pred.TTFTMs = p.prefill(c) * 1e3
	c.pred.Bottleneck = p.bottleneck(c, worst)
}

func (p *planner) bottleneck(c *candidate, worst int) string {
	S := len(c.shapes)
	if c.pred.MicroBatches < S && c.pred.BubbleFrac > 0.25 {
		return fmt.Sprintf("pipeline bubble: %d micro-batches over %d stages (raise --max-num-seqs)", c.pred.MicroBatches, S)
	}
	cs := c.costs[worst]
	hw := &p.hosts[c.shapes[worst].host]
	link := "PCIe"
	if hw.nvlink {
		link = "NVLink"
	}
	mem := cs.weights + cs.kv
	parts := []struct {
		name string
		v    float64
	}{
		{"HBM bandwidth (weights)", cs.weights},
		{"HBM bandwidth (KV cache)", cs.kv},
		{"compute (GEMM)", cs.compute - mem},
		{link + " collectives", cs.comm},
		{"kernel launch overhead", cs.overhead},
		{"network hop between stages", cs.hop},
	}
	if cs.compute > mem {
		parts[0].v, parts[1].v, parts[2].v = 0, 0, cs.compute
	}
	best := 0
	for i, pt := range parts {
		if pt.v > parts[best].v {
			best = i
		}
	}
	return fmt.Sprintf("%s on stage %d (%s, %.0f%% of its time)", parts[best].name, worst,
		hw.host.Name, 100*parts[best].v/math.Max(cs.total(), 1e-12))
}

// prefill is the time to first token of one InputLen request on an idle
// pipeline, in max-num-batched-tokens chunks.
func (p *planner) prefill(c *candidate) float64 {
	chunk := min(p.req.InputLen, p.req.MaxNumBatchedTokens)
	L := p.cfg.NumHiddenLayers
	var t float64
	for start := 0; start < p.req.InputLen; start += chunk {
		T := float64(min(chunk, p.req.InputLen-start))
		ctx := float64(start) + T/2
		for s, sh := range c.shapes {
			for l := c.splits[s]; l < c.splits[s+1]; l++ {
				t += p.layerCost(sh, l, T, 1, ctx).total()
			}
			if s == 0 {
				t += p.headCost(sh, T).total()
			}
			t += p.ringHop(c, s, T)
		}
		// Back at the head: lm_head and the MTP layer.
		sh := c.shapes[0]
		hw := &p.hosts[sh.host]
		lm := cost{weights: float64(p.w.top[wLMHead]) / float64(sh.n) / p.hbm(hw),
			overhead: kernelsLM * hw.eff.KernelOverheadUS * 1e-6}
		t += lm.total()
		if !p.req.DisableMTP {
			t += p.layerCost(sh, L, T, 1, ctx).total()
		}
	}
	return t
}

// ringHop is stage s's send of T rows to the next stage; the last stage
// sends the final hidden rows back to the head (one stage: nothing moves but
// the sampled ids, modelled as an empty hop).
func (p *planner) ringHop(c *candidate, s int, T float64) float64 {
	S := len(c.shapes)
	if S == 1 {
		return p.hopCost(c.shapes[0], c.shapes[0], 0)
	}
	return p.hopCost(c.shapes[s], c.shapes[(s+1)%S], T)
}

// stageKVPerToken is the KV bytes per token on one GPU of stage s.
func (p *planner) stageKVPerToken(c *candidate, s int) int64 {
	layers := c.splits[s+1] - c.splits[s]
	if s == 0 && !p.req.DisableMTP { // the MTP layer's KV lives on the head
		layers++
	}
	return int64(layers) * p.w.kvBytesPerToken(c.shapes[s].n, p.kvElem)
}

// stageMemory is the exact memory plan of each GPU of stage s.
func (p *planner) stageMemory(c *candidate, s int) []GPUMemory {
	sh := c.shapes[s]
	hw := &p.hosts[sh.host]
	tail := s == 0 // the head stage holds lm_head, the final norm and the MTP layer
	L := p.cfg.NumHiddenLayers
	layers := make([]int, 0, c.splits[s+1]-c.splits[s]+1)
	for l := c.splits[s]; l < c.splits[s+1]; l++ {
		layers = append(layers, l)
	}
	if tail && !p.req.DisableMTP {
		layers = append(layers, L)
	}
	kvTok := p.stageKVPerToken(c, s)
	act := p.activationBytes(sh, tail)
	graphs := p.graphBytes(tail)
	out := make([]GPUMemory, sh.n)
	for g := 0; g < sh.n; g++ {
		var kinds [numWeightKinds]int64
		if s == 0 {
			kinds[wEmbedding] += p.w.top[wEmbedding] / int64(sh.n)
		}
		if tail {
			kinds[wLMHead] += p.w.top[wLMHead] / int64(sh.n)
			kinds[wNorm] += p.w.top[wNorm]
		}
		for _, l := range layers {
			var experts []int
			if sh.ep && sh.n > 1 && p.w.layers[l].kind != model.LayerDense {
				experts = p.placement(l, sh.n).gpus[g]
			}
			p.w.layerGPUBytes(&kinds, l, sh.n, experts)
		}
		byKind := map[string]int64{}
		for k, v := range kinds {
			if v != 0 {
				byKind[reportKind[k]] += v
			}
		}
		wt := sumKinds(kinds)
		// The engine's sizing arithmetic (MemoryPlan), unrounded to blocks
		// so that an overfull GPU shows by how much.
		mp := MemoryPlan{Total: hw.memory, Utilization: p.req.GPUMemoryUtil, Weights: wt, Activations: act,
			Graphs: graphs, Runtime: p.req.RuntimeReserve}
		pool := mp.Budget() - mp.NonKV()
		need := int64(p.needTokens) * kvTok
		out[g] = GPUMemory{Host: hw.host.Name, GPU: c.offsets[s] + g, Stage: s, Total: hw.memory, Budget: mp.Budget(),
			Weights: byKind, WeightsTotal: wt, KVCache: pool, KVRequired: need, Activations: act, Graphs: graphs,
			Reserve: p.req.RuntimeReserve, Headroom: pool - need}
	}
	return out
}

// stages renders a candidate's stages.
func (p *planner) stages(c *candidate) []Stage {
	S := len(c.shapes)
	out := make([]Stage, S)
	for s, sh := range c.shapes {
		gpus := make([]int, sh.n)
		for g := range gpus {
			gpus[g] = c.offsets[s] + g
		}
		ep := 1
		if sh.ep {
			ep = sh.n
		}
		var ms float64
		if c.times != nil {
			ms = c.times[s] * 1e3
		}
		out[s] = Stage{Index: s, Host: p.hosts[sh.host].host.Name, GPUs: gpus,
			Layers: [2]int{c.splits[s], c.splits[s+1]}, TP: sh.n, EP: ep,
			Embedding: s == 0, LMHead: s == 0, MTP: s == 0 && !p.req.DisableMTP, DecodeMs: ms}
	}
	return out
}

// describe summarizes a candidate: "PP2 × (TP4, EP4) on host0, host1".
func (p *planner) describe(c *candidate) string {
	var hostNames []string
	seen := map[int]bool{}
	kinds := map[string]int{}
	var order []string
	for _, sh := range c.shapes {
		if !seen[sh.host] {
			seen[sh.host] = true
			hostNames = append(hostNames, p.hosts[sh.host].host.Name)
		}
		k := fmt.Sprintf("TP%d", sh.n)
		if sh.ep {
			k = fmt.Sprintf("TP%d+EP%d", sh.n, sh.n)
		}
		if kinds[k] == 0 {
			order = append(order, k)
		}
		kinds[k]++
	}
	var parts []string
	for _, k := range order {
		parts = append(parts, fmt.Sprintf("%d×%s", kinds[k], k))
	}
	return fmt.Sprintf("PP%d [%s] on %s", len(c.shapes), strings.Join(parts, ", "), strings.Join(hostNames, ","))
}

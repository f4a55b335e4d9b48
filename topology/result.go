package topology

import (
	"fmt"
	"math"
	"sort"
	"strings"

	"github.com/glmtopo/glmtopo/model"
)

// Plan finds the fastest placement of req.Model on req.Inventory that fits,
// with the next best as alternatives. An infeasible request is not an
// error: the result has Feasible false and a Reason saying what does not fit
// by how much and which smallest changes would fit. Errors are bad input.
func Plan(req PlanRequest) (*PlanResult, error) {
	req, err := req.withDefaults()
	if err != nil {
		return nil, err
	}
	return planWith(req, newModelWeights(req.Model))
}

func planWith(req PlanRequest, w *modelWeights) (*PlanResult, error) {
	p, err := newPlanner(req, w)
	if err != nil {
		return nil, err
	}
	res := &PlanResult{
		Model: req.ModelName, ModelHash: req.Model.Hash(), Hosts: req.Inventory.Hosts, hw: p.hosts,
		Settings: Settings{
			MaxModelLen: req.MaxModelLen, MaxNumSeqs: req.MaxNumSeqs, MaxNumBatchedTokens: req.MaxNumBatchedTokens,
			KVCacheDType: kvName(req.KVCacheDType), GPUMemoryUtilization: req.GPUMemoryUtil,
			RuntimeReserveBytes: req.RuntimeReserve, MTP: !req.DisableMTP, SpeculativeTokens: p.spec,
			MTPAcceptance: req.MTPAcceptance, InputLen: req.InputLen, OutputLen: req.OutputLen,
			ExpertParallel: req.ExpertParallel, RedundantExperts: req.RedundantExperts,
		},
		Weights: WeightsSummary{TotalBytes: w.total(), ByDType: w.byDType},
		// Empty lists, not null, in the plan file.
		Stages: []Stage{}, Memory: []GPUMemory{}, Experts: []LayerExperts{}, Alternatives: []Alternative{},
	}
	var feasible, closest []*candidate
	var invalid []string
	for _, c := range p.candidates() {
		p.solve(c)
		switch {
		case c.invalid != "":
			invalid = append(invalid, c.invalid)
		case c.times != nil:
			feasible = append(feasible, c)
		default:
			closest = append(closest, c)
		}
	}
	res.Rejected = dedupe(invalid)
	if len(feasible) == 0 {
		p.explainInfeasible(res, closest, invalid)
		return res, nil
	}
	sort.SliceStable(feasible, func(i, j int) bool {
		a, b := feasible[i], feasible[j]
		if d := a.pred.DecodeTokensPerS - b.pred.DecodeTokensPerS; math.Abs(d) > 1e-9*a.pred.DecodeTokensPerS {
			return d > 0
		}
		return gpusUsed(a) < gpusUsed(b)
	})
	best := feasible[0]
	p.finish(best)
	if !req.DisableMTP {
		best.pred.NoMTPDecodeTokensPerS = p.withoutMTP(best)
		best.pred.applyStepRatio(req.MTPStepRatio, p.tau, req.MaxNumSeqs) // spec_ratio.go
	}
	res.Feasible = true
	res.Stages = p.stages(best)
	res.Predicted = best.pred
	var fullest *GPUMemory
	for s := range best.shapes {
		for _, g := range p.stageMemory(best, s) {
			res.Memory = append(res.Memory, g)
		}
	}
	for i := range res.Memory {
		if fullest == nil || res.Memory[i].Headroom < fullest.Headroom {
			fullest = &res.Memory[i]
		}
	}
	res.Reason = fmt.Sprintf("fits: %s; the fullest GPU (%s GPU %d) has %.1f GiB of its %.1f GiB budget left after weights %.1f GiB, KV %.1f GiB (%d×%d tokens), activations %.1f GiB, decode graphs %.1f GiB and reserve %.1f GiB",
		p.describe(best), fullest.Host, fullest.GPU, gib(fullest.Headroom), gib(fullest.Budget), gib(fullest.WeightsTotal),
		gib(fullest.KVRequired), req.MaxNumSeqs, req.MaxModelLen, gib(fullest.Activations), gib(fullest.Graphs), gib(fullest.Reserve))
	res.Experts = append(res.Experts, p.experts(best)...)
	for _, c := range feasible[1:] {
		if len(res.Alternatives) >= req.MaxAlternatives {
			break
		}
		p.finish(c)
		res.Alternatives = append(res.Alternatives, Alternative{Summary: p.describe(c), Stages: p.stages(c), Predicted: c.pred})
	}
	return res, nil
}

// withoutMTP predicts c's shapes with MTP off (and its layer unloaded),
// re-splitting the layers; 0 if that does not fit.
func (p *planner) withoutMTP(c *candidate) float64 {
	req := p.req
	req.DisableMTP = true
	q, err := newPlanner(req, p.w)
	if err != nil {
		return 0
	}
	alt := &candidate{shapes: c.shapes, offsets: c.offsets}
	q.solve(alt)
	if alt.times == nil {
		return 0
	}
	return alt.pred.DecodeTokensPerS
}

func gpusUsed(c *candidate) int {
	n := 0
	for _, sh := range c.shapes {
		n += sh.n
	}
	return n
}

func gib(b int64) float64 { return float64(b) / (1 << 30) }

func kvName(s string) string {
	if s == "auto" || s == "" {
		return "bf16"
	}
	return s
}

// experts lists the physical expert placement of every MoE layer on EP stages.
func (p *planner) experts(c *candidate) []LayerExperts {
	var out []LayerExperts
	S := len(c.shapes)
	for s, sh := range c.shapes {
		if !sh.ep || sh.n == 1 {
			continue
		}
		end := c.splits[s+1]
		if s == S-1 && !p.req.DisableMTP {
			end = p.cfg.NumLayers()
		}
		for l := c.splits[s]; l < end; l++ {
			if p.w.layers[l].kind == model.LayerDense {
				continue
			}
			pl := p.placement(l, sh.n)
			out = append(out, LayerExperts{Layer: l, Stage: s, GPUs: pl.gpus, Replicas: pl.replicas})
		}
	}
	return out
}

// explainInfeasible says what does not fit by how much and what would.
func (p *planner) explainInfeasible(res *PlanResult, closest []*candidate, invalid []string) {
	req := p.req
	what := fmt.Sprintf("%s (%.1f GiB of weights) does not fit %s at %d tokens × %d sequences",
		req.ModelName, gib(p.w.total()), inventorySummary(p.hosts), req.MaxModelLen, req.MaxNumSeqs)
	if len(closest) == 0 {
		uniq := dedupe(invalid)
		res.Reason = what + ": no valid configuration: " + strings.Join(uniq, "; ")
		return
	}
	sort.SliceStable(closest, func(i, j int) bool { return closest[i].shortfall < closest[j].shortfall })
	c := closest[0]
	var worst *GPUMemory
	for s := range c.shapes {
		for _, g := range p.stageMemory(c, s) {
			res.Memory = append(res.Memory, g)
		}
	}
	for i := range res.Memory {
		if worst == nil || res.Memory[i].Headroom < worst.Headroom {
			worst = &res.Memory[i]
		}
	}
	res.Stages = p.stages(c)
	var usable float64
	for _, h := range p.hosts {
		usable += float64(h.memory) * float64(h.host.GPUs) * req.GPUMemoryUtil
	}
	res.Reason = fmt.Sprintf("%s: the closest split (%s) is %.1f GiB over on %s GPU %d (weights %.1f + KV %.1f + activations %.1f + graphs %.1f + reserve %.1f GiB > budget %.1f GiB at --gpu-memory-utilization %g); all GPUs together offer %.1f GiB",
		what, p.describe(c), gib(-worst.Headroom), worst.Host, worst.GPU, gib(worst.WeightsTotal), gib(worst.KVRequired),
		gib(worst.Activations), gib(worst.Graphs), gib(worst.Reserve), gib(worst.Budget), req.GPUMemoryUtil, usable/(1<<30))
	if req.noSuggestions {
		return
	}
	res.Suggestions = p.suggest()
	if len(res.Suggestions) > 0 {
		res.Reason += ". Would fit with: " + strings.Join(res.Suggestions, "; or ")
	} else {
		res.Reason += ". No single change tried (FP8 weights or KV cache, shorter context, fewer sequences, up to 8 more hosts) fits"
	}
}

func dedupe(xs []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, x := range xs {
		if !seen[x] {
			seen[x] = true
			out = append(out, x)
		}
	}
	return out
}

func inventorySummary(hosts []hostHW) string {
	var parts []string
	for i := 0; i < len(hosts); {
		j := i
		for j < len(hosts) && hosts[j].host.GPUs == hosts[i].host.GPUs && hosts[j].gpu.Name == hosts[i].gpu.Name {
			j++
		}
		parts = append(parts, fmt.Sprintf("%dx%dx%s", j-i, hosts[i].host.GPUs, hosts[i].gpu.Name))
		i = j
	}
	return strings.Join(parts, ",")
}

// suggest tries the smallest changes one at a time and lists those that fit.
func (p *planner) suggest() []string {
	base := p.req
	base.noSuggestions = true
	fits := func(r PlanRequest, w *modelWeights) bool {
		res, err := planWith(r, w)
		return err == nil && res.Feasible
	}
	allFP8 := true
	for _, h := range p.hosts {
		allFP8 = allFP8 && h.gpu.FP8()
	}
	var out []string
	if allFP8 && p.kvElem == 2 {
		r := base
		r.KVCacheDType = "fp8"
		if fits(r, p.w) {
			out = append(out, "--kv-cache-dtype fp8")
		}
	}
	if base.GPUMemoryUtil < 0.95 {
		r := base
		r.GPUMemoryUtil = 0.95
		if fits(r, p.w) {
			out = append(out, "--gpu-memory-utilization 0.95")
		}
	}
	for l := base.MaxModelLen / 2; l >= 1024; l /= 2 {
		r := base
		r.MaxModelLen = l
		r.InputLen, r.OutputLen = min(r.InputLen, l/2), min(r.OutputLen, l/2)
		if fits(r, p.w) {
			out = append(out, fmt.Sprintf("a shorter context (--max-model-len %d)", l))
			break
		}
	}
	for n := base.MaxNumSeqs / 2; n >= 1; n /= 2 {
		r := base
		r.MaxNumSeqs = n
		if fits(r, p.w) {
			out = append(out, fmt.Sprintf("fewer sequences (--max-num-seqs %d)", n))
			break
		}
	}
	if allFP8 && !p.w.fp8 {
		cfg := p.cfg.Clone()
		cfg.Quantization = model.FP8PerChannel()
		r := base
		r.Model = cfg
		if fits(r, newModelWeights(cfg)) {
			out = append(out, "the FP8 checkpoint (e.g. --model "+fp8Name(base.ModelName)+")")
		}
	}
	// More hosts like the largest one.
	big := p.hosts[0]
	for _, h := range p.hosts {
		if h.memory*int64(h.host.GPUs) > big.memory*int64(big.host.GPUs) {
			big = h
		}
	}
	for extra := 1; extra <= 8; extra++ {
		r := base
		r.Inventory.Hosts = append([]Host(nil), base.Inventory.Hosts...)
		for i := 0; i < extra; i++ {
			h := big.host
			h.Name = fmt.Sprintf("%s-extra%d", big.host.Name, i+1)
			h.Address = ""
			r.Inventory.Hosts = append(r.Inventory.Hosts, h)
		}
		if fits(r, p.w) {
			noun := "host"
			if extra > 1 {
				noun = "hosts"
			}
			out = append(out, fmt.Sprintf("%d more %dx%s %s (%d hosts)", extra, big.host.GPUs, big.gpu.Name, noun, len(r.Inventory.Hosts)))
			break
		}
	}
	return out
}

func fp8Name(name string) string {
	if strings.HasPrefix(name, "glm-") {
		return name + "-fp8"
	}
	return "<the FP8 checkpoint>"
}

package topology

import (
	"fmt"
	"math"
	"sort"

	"github.com/glmtopo/glmtopo/model"
)

// planner holds one request's resolved inputs and memoized sub-results.
type planner struct {
	req        PlanRequest
	cfg        *model.Config
	w          *modelWeights
	hosts      []hostHW
	kvElem     int
	spec       int     // speculative tokens per step (0 without MTP)
	tau        float64 // expected tokens per sequence per step
	needTokens float64 // KV tokens every stage must hold
	probs      [][]float64
	placements map[[2]int]*expertPlacement
	touchMemo  map[touchKey]float64
	prefix     map[prefixKey]*stagePrefix
}

func newPlanner(req PlanRequest, w *modelWeights) (*planner, error) {
	hosts, err := resolveHosts(req.Inventory, req.Calibration)
	if err != nil {
		return nil, err
	}
	p := &planner{req: req, cfg: req.Model, w: w, hosts: hosts, kvElem: 2,
		placements: map[[2]int]*expertPlacement{}, touchMemo: map[touchKey]float64{},
		prefix: map[prefixKey]*stagePrefix{}}
	if req.KVCacheDType == "fp8" {
		p.kvElem = 1
	}
	p.tau = 1
	if !req.DisableMTP {
		p.spec = req.SpeculativeTokens
		a := 1.0
		for i := 0; i < p.spec; i++ {
			a *= req.MTPAcceptance
			p.tau += a
		}
	}
	p.needTokens = float64(req.MaxModelLen) * float64(req.MaxNumSeqs)
	p.probs = make([][]float64, len(w.layers))
	for l := range w.layers {
		if w.layers[l].kind != model.LayerDense {
			p.probs[l] = req.ExpertLoad.probs(p.cfg, l)
		}
	}
	return p, nil
}

// redundant is the number of extra physical experts per layer of an n-GPU EP stage.
func (p *planner) redundant(n int) int {
	switch {
	case p.req.RedundantExperts > 0:
		return p.req.RedundantExperts
	case p.req.ExpertLoad != nil:
		return n
	}
	return 0
}

// placement is layer l's EPLB placement over n GPUs, memoized.
func (p *planner) placement(l, n int) *expertPlacement {
	key := [2]int{l, n}
	if pl, ok := p.placements[key]; ok {
		return pl
	}
	load := make([]float64, p.cfg.NRoutedExperts)
	var counts []float64
	if p.req.ExpertLoad != nil {
		counts = p.req.ExpertLoad.Layers[l]
	}
	for e := range load {
		load[e] = 1
		if counts != nil {
			load[e] = counts[e]
		}
	}
	pl := eplb(load, n, p.cfg.NRoutedExperts+p.redundant(n))
	p.placements[key] = &pl
	return &pl
}

// shapeInvalid says why a stage shape cannot run the model ("" when it can).
func (p *planner) shapeInvalid(sh stageShape) string {
	hw := &p.hosts[sh.host]
	c := p.cfg
	if p.w.fp8 && !hw.gpu.FP8() {
		return fmt.Sprintf("FP8 weights need FP8 tensor cores, which %s lacks (use the bf16 checkpoint)", hw.gpu.Name)
	}
	if p.kvElem == 1 && !hw.gpu.FP8() {
		return fmt.Sprintf("--kv-cache-dtype fp8 needs FP8 support, which %s lacks", hw.gpu.Name)
	}
	if c.NumAttentionHeads%sh.n != 0 {
		return fmt.Sprintf("TP %d does not divide the %d attention heads", sh.n, c.NumAttentionHeads)
	}
	if sh.n > c.NumKeyValueHeads && sh.n%c.NumKeyValueHeads != 0 || sh.n <= c.NumKeyValueHeads && c.NumKeyValueHeads%sh.n != 0 {
		return fmt.Sprintf("TP %d neither divides nor is a multiple of the %d kv heads", sh.n, c.NumKeyValueHeads)
	}
	if sh.ep && c.NRoutedExperts+p.redundant(sh.n) < sh.n {
		return fmt.Sprintf("EP %d exceeds the %d routed experts", sh.n, c.NRoutedExperts)
	}
	if !p.w.fp8 || sh.n == 1 {
		return ""
	}
	q := c.Quantization
	block := 128
	if q.Scheme == model.QuantBlock {
		block = q.BlockSize[0]
	}
	split := func(what string, cols int) string {
		if cols%sh.n != 0 || (cols/sh.n)%block != 0 {
			return fmt.Sprintf("FP8 %s split by TP %d gives %d columns per GPU, not a multiple of the %d-column quantization block",
				what, sh.n, cols/sh.n, block)
		}
		return ""
	}
	if !sh.ep {
		if r := split("routed experts (moe_intermediate_size "+fmt.Sprint(c.MoEIntermediateSize)+")", c.MoEIntermediateSize); r != "" {
			return r + "; use expert parallelism"
		}
	}
	if q.Scheme == model.QuantBlock {
		for _, s := range []struct {
			what string
			cols int
		}{{"dense MLP", c.IntermediateSize}, {"shared expert", c.MoEIntermediateSize * max(1, c.NSharedExperts)}, {"attention", c.QDim()}} {
			if r := split(s.what, s.cols); r != "" {
				return r
			}
		}
	}
	return ""
}

// stagePrefix holds prefix sums over the main layers for one stage shape.
type stagePrefix struct {
	time []float64 // decode seconds
	mem  []float64 // weight bytes on the fullest GPU + required KV bytes
	head cost      // embedding
	tail cost      // lm_head and MTP drafts (on the head stage, stage 0)
	// headMem, tailMem: embedding; lm_head, final norm and the MTP layer (weights + KV).
	headMem, tailMem float64
	budget           float64 // utilisation budget minus reserve and activations (non-tail)
	tailAct          float64 // extra activation memory of lm_head and MTP (the head stage)
}

type prefixKey struct {
	hw   string
	n    int
	ep   bool
	b, T float64
}

// stagePrefix computes (memoized) the per-layer sums of a stage shape at
// decode micro-batch b (T tokens).
func (p *planner) stagePrefix(sh stageShape, b, T float64) *stagePrefix {
	hw := &p.hosts[sh.host]
	key := prefixKey{hw.key, sh.n, sh.ep, b, T}
	if sp, ok := p.prefix[key]; ok {
		return sp
	}
	L := p.cfg.NumHiddenLayers
	ctx := p.decodeCtx()
	sp := &stagePrefix{time: make([]float64, L+1), mem: make([]float64, L+1)}
	kvTok := float64(p.w.kvBytesPerToken(sh.n, p.kvElem))
	for l := 0; l < L; l++ {
		sp.time[l+1] = sp.time[l] + p.layerCost(sh, l, T, b, ctx).total()
		sp.mem[l+1] = sp.mem[l] + float64(p.layerMaxBytes(sh, l)) + p.needTokens*kvTok
	}
	sp.head = p.headCost(sh, T)
	sp.tail = p.tailCost(sh, T, b, ctx)
	n := sh.n
	sp.headMem = float64(p.w.top[wEmbedding] / int64(n))
	sp.tailMem = float64(p.w.top[wLMHead]/int64(n) + p.w.top[wNorm])
	if !p.req.DisableMTP {
		sp.tailMem += float64(p.layerMaxBytes(sh, L)) + p.needTokens*kvTok
	}
	act := p.activationBytes(sh, false) + p.graphBytes(false)
	sp.tailAct = float64(p.activationBytes(sh, true) + p.graphBytes(true) - act)
	sp.budget = float64(hw.memory)*p.req.GPUMemoryUtil - float64(p.req.RuntimeReserve) - float64(act)
	p.prefix[key] = sp
	return sp
}

// layerMaxBytes is layer l's weight bytes on the fullest GPU of the stage.
func (p *planner) layerMaxBytes(sh stageShape, l int) int64 {
	if !sh.ep || sh.n == 1 || p.w.layers[l].kind == model.LayerDense {
		var b [numWeightKinds]int64
		p.w.layerGPUBytes(&b, l, sh.n, nil)
		return sumKinds(b)
	}
	var most int64
	for _, experts := range p.placement(l, sh.n).gpus {
		var b [numWeightKinds]int64
		p.w.layerGPUBytes(&b, l, sh.n, experts)
		most = max(most, sumKinds(b))
	}
	return most
}

func sumKinds(b [numWeightKinds]int64) int64 {
	var s int64
	for _, v := range b {
		s += v
	}
	return s
}

// decodeCtx is the mean context of a decoding sequence.
func (p *planner) decodeCtx() float64 {
	return float64(p.req.InputLen) + float64(p.req.OutputLen)/2
}

// splitLayers finds the contiguous split of the main layers over the stages
// that minimizes the slowest stage's decode time while every stage fits its
// memory (objective "time"), or, when none fits, minimizes the largest
// memory overflow per GPU (objective "memory"). It returns the boundaries
// (len S+1) and the objective's value.
func (p *planner) splitLayers(shapes []stageShape, pre []*stagePrefix, byMemory bool) ([]int, float64) {
	S, L := len(shapes), p.cfg.NumHiddenLayers
	if S > L {
		return nil, math.Inf(1)
	}
	inf := math.Inf(1)
	stageVal := func(s, i, j int) float64 {
		sp := pre[s]
		mem := sp.mem[j] - sp.mem[i]
		budget := sp.budget
		t := sp.time[j] - sp.time[i]
		if s == 0 {
			mem += sp.headMem
			t += sp.head.total()
		}
		if s == 0 { // the head stage also holds lm_head and the MTP layer (distributed.md)
			mem += sp.tailMem
			budget -= sp.tailAct
			t += sp.tail.total()
		}
		if byMemory {
			return mem - budget
		}
		if mem > budget {
			return inf
		}
		return t
	}
	f := make([][]float64, S)
	from := make([][]int32, S)
	for s := range f {
		f[s] = make([]float64, L+1)
		from[s] = make([]int32, L+1)
		for j := range f[s] {
			f[s][j] = inf
		}
	}
	for j := 1; j <= L-(S-1); j++ {
		f[0][j] = stageVal(0, 0, j)
	}
	for s := 1; s < S; s++ {
		for j := s + 1; j <= L-(S-1-s); j++ {
			best, arg := inf, -1
			for i := s; i < j; i++ {
				if f[s-1][i] >= best {
					continue
				}
				v := max(f[s-1][i], stageVal(s, i, j))
				if v < best {
					best, arg = v, i
				}
			}
			f[s][j], from[s][j] = best, int32(arg)
		}
	}
	if math.IsInf(f[S-1][L], 1) {
		return nil, inf
	}
	splits := make([]int, S+1)
	splits[S] = L
	for s, j := S-1, L; s > 0; s-- {
		j = int(from[s][j])
		splits[s] = j
	}
	return splits, f[S-1][L]
}

// candidate is one configuration the search tried.
type candidate struct {
	shapes    []stageShape
	offsets   []int // first GPU of each stage on its host
	splits    []int
	invalid   string
	shortfall float64 // bytes over budget on the fullest GPU, when infeasible
	pred      Prediction
	times     []float64 // decode seconds per stage
	costs     []cost    // the same split by component (reported candidates only)
}

// strategies lists the host subsets and stage shapes to try.
func (p *planner) candidates() []*candidate {
	hostSets := [][]int{}
	all := make([]int, len(p.hosts))
	for i := range all {
		all[i] = i
	}
	hostSets = append(hostSets, all)
	byCap := append([]int(nil), all...)
	sort.SliceStable(byCap, func(a, b int) bool {
		ha, hb := p.hosts[byCap[a]], p.hosts[byCap[b]]
		return ha.memory*int64(ha.host.GPUs) > hb.memory*int64(hb.host.GPUs)
	})
	var totalW float64 = float64(p.w.total())
	for k := len(p.hosts) - 1; k >= 1; k-- {
		sub := append([]int(nil), byCap[:k]...)
		var capacity float64
		for _, h := range sub {
			capacity += float64(p.hosts[h].memory) * float64(p.hosts[h].host.GPUs) * p.req.GPUMemoryUtil
		}
		if capacity < totalW {
			break
		}
		sort.Ints(sub)
		hostSets = append(hostSets, sub)
	}
	modes := []bool{false, true}
	switch p.req.ExpertParallel {
	case "on":
		modes = []bool{true}
	case "off":
		modes = []bool{false}
	}
	var out []*candidate
	for _, set := range hostSets {
		for level := 0; level < 7; level++ {
			if level > 0 {
				done := true
				for _, h := range set {
					if p.hosts[h].host.GPUs>>(level-1) > 1 {
						done = false
					}
				}
				if done {
					break
				}
			}
			var shapesTP []stageShape
			var offsets []int
			ok := true
			for _, h := range set {
				g := p.hosts[h].host.GPUs
				n := max(1, g>>level)
				if g%n != 0 {
					ok = false
					break
				}
				for off := 0; off < g; off += n {
					shapesTP = append(shapesTP, stageShape{host: h, n: n})
					offsets = append(offsets, off)
				}
			}
			if !ok {
				continue
			}
			if len(shapesTP) > p.cfg.NumHiddenLayers {
				break
			}
			for _, ep := range modes {
				shapes := append([]stageShape(nil), shapesTP...)
				multi := false
				for i := range shapes {
					shapes[i].ep = ep && shapes[i].n > 1
					multi = multi || shapes[i].n > 1
				}
				if ep && !multi && p.req.ExpertParallel != "on" {
					continue // identical to the TP variant
				}
				out = append(out, &candidate{shapes: shapes, offsets: offsets})
			}
		}
	}
	return out
}

// solve splits layers for a candidate and predicts it.
func (p *planner) solve(c *candidate) {
	for _, sh := range c.shapes {
		if r := p.shapeInvalid(sh); r != "" {
			c.invalid = fmt.Sprintf("%s: %s", p.hosts[sh.host].host.Name, r)
			return
		}
	}
	S := len(c.shapes)
	B := p.req.MaxNumSeqs
	m := min(S, B)
	b := math.Ceil(float64(B) / float64(m))
	T := b * float64(1+p.spec)
	pre := make([]*stagePrefix, S)
	for s, sh := range c.shapes {
		pre[s] = p.stagePrefix(sh, b, T)
	}
	splits, _ := p.splitLayers(c.shapes, pre, false)
	if splits == nil {
		var over float64
		splits, over = p.splitLayers(c.shapes, pre, true)
		c.splits = splits
		c.shortfall = over
		if splits == nil {
			c.invalid = fmt.Sprintf("%d stages exceed the %d layers", S, p.cfg.NumHiddenLayers)
		}
		return
	}
	c.splits = splits
	p.predictDecode(c, m, b, T)
}

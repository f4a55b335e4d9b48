package topology

import (
	"errors"
	"fmt"

	"github.com/glmtopo/glmtopo/model"
)

// ServeShape is a closed-loop serving benchmark as `glmtopo bench serve`
// (and `vllm bench serve`) runs it with --request-rate inf: NumPrompts
// requests of InputLen prompt and OutputLen output tokens, at most
// Concurrency in flight (0: all at once), each sent when one finishes.
type ServeShape struct {
	Concurrency int `json:"concurrency" yaml:"concurrency"`
	NumPrompts  int `json:"num_prompts" yaml:"num_prompts"`
	InputLen    int `json:"input_len" yaml:"input_len"`
	OutputLen   int `json:"output_len" yaml:"output_len"`
}

// ServePrediction is the cost model's answer for a ServeShape, in the
// benchmark's own terms.
type ServePrediction struct {
	ServeShape         `yaml:",inline"`
	OutputTokensPerS   float64 `json:"output_tokens_per_s" yaml:"output_tokens_per_s"`
	TotalTokensPerS    float64 `json:"total_tokens_per_s" yaml:"total_tokens_per_s"`
	MeanTTFTMs         float64 `json:"mean_ttft_ms" yaml:"mean_ttft_ms"`
	MeanTPOTMs         float64 `json:"mean_tpot_ms" yaml:"mean_tpot_ms"`
	DurationS          float64 `json:"duration_s" yaml:"duration_s"`
	Steps              int     `json:"steps" yaml:"steps"`
	Bottleneck         string  `json:"bottleneck" yaml:"bottleneck"` // the busiest resource: a stage, or a machine's cores
	BottleneckFraction float64 `json:"bottleneck_fraction" yaml:"bottleneck_fraction"`
}

// cpuPipeline is a CPU plan as the engine runs it: stages [splits[s],
// splits[s+1]) on machines[s], the head (stage 0) keeping micro micro-batches
// in the ring, each with its own prefill budget of budget tokens.
type cpuPipeline struct {
	spec     CPUSpec
	cfg      *model.Config
	splits   []int
	machines []int
	micro    int
	budget   int
	maxSeqs  int
}

func (p *cpuPipeline) validate() error {
	S := len(p.splits) - 1
	switch {
	case p.cfg == nil:
		return errors.New("cpu pipeline: no model")
	case S < 1 || len(p.machines) != S:
		return fmt.Errorf("cpu pipeline: %d layer boundaries for %d machines", len(p.splits), len(p.machines))
	case p.splits[0] != 0 || p.splits[S] != p.cfg.NumHiddenLayers:
		return fmt.Errorf("cpu pipeline: layers %v do not cover the model's %d", p.splits, p.cfg.NumHiddenLayers)
	case p.micro < 1 || p.budget < 1 || p.maxSeqs < 1:
		return fmt.Errorf("cpu pipeline: micro-batches %d, prefill budget %d, max-num-seqs %d must be positive", p.micro, p.budget, p.maxSeqs)
	}
	for s := 0; s < S; s++ {
		if p.splits[s+1] <= p.splits[s] {
			return fmt.Errorf("cpu pipeline: stage %d has no layers (%v)", s, p.splits)
		}
	}
	return p.spec.Validate()
}

// Names of the bounds a round's time can hit.
const (
	boundTrip    = "a micro-batch's trip through the stages"
	boundStage   = "stage %d's own time"
	boundMachine = "the machine's %.1f effective cores (its stages share them)"
)

// round is the time of one engine round: every micro-batch of groups once
// through every stage and back to the head. It is the largest of three
// bounds: one micro-batch's trip round the ring, one stage running all its
// micro-batches in turn, and a machine's cores running all the work of its
// stages (core-seconds over cores; a single process leaves cores idle in
// its serial parts, which another process's stage can use).
func (p *cpuPipeline) round(groups []cpuBatch) (float64, string) {
	S := len(p.splits) - 1
	H := float64(p.cfg.HiddenSize)
	stage := make([]float64, S)
	machine := map[int]float64{}
	var trip float64
	for _, g := range groups {
		var t float64
		for s := 0; s < S; s++ {
			w := cpuStage(p.spec, p.cfg, p.splits[s], p.splits[s+1], s == 0, g)
			if S > 1 { // f32 hidden rows to the next stage, the last back to the head
				w.add(p.spec.hop(g.T * H * 4))
			}
			t += w.alone
			stage[s] += w.alone
			machine[p.machines[s]] += w.core
		}
		trip = max(trip, t)
	}
	best, why := trip, boundTrip
	for s, t := range stage {
		if t > best*(1+1e-9) {
			best, why = t, fmt.Sprintf(boundStage, s)
		}
	}
	cores := p.spec.parallelCores()
	for _, c := range machine {
		if t := c / cores; t > best*(1+1e-9) {
			best, why = t, fmt.Sprintf(boundMachine, cores)
		}
	}
	return best, why
}

// simSeq is one request in the simulated benchmark.
type simSeq struct {
	prefilled, generated int
	chunk                int
	start, first         float64
}

// form takes the next micro-batch from the sequences not in the ring, as
// the head's scheduler does (stage_sched.go formMicroBatch; the whole batch
// for a single process): up to limit of them in order, decode tokens first,
// then prompt chunks within the micro-batch's prefill budget. It returns
// the batch's shape, its members and the sequences left out.
func (p *cpuPipeline) form(pool []*simSeq, limit, in int) (cpuBatch, []*simSeq, []*simSeq) {
	pick := pool[:min(limit, len(pool))]
	rest := append([]*simSeq(nil), pool[len(pick):]...)
	budget := p.budget
	for _, r := range pick {
		if r.prefilled >= in {
			budget--
		}
	}
	var g cpuBatch
	var members []*simSeq
	for _, r := range pick {
		r.chunk = 0
		if r.prefilled >= in {
			g.T++
			g.pairs += float64(in + r.generated)
		} else {
			if budget <= 0 {
				rest = append(rest, r) // its prompt continues in a later micro-batch
				continue
			}
			r.chunk = min(budget, in-r.prefilled)
			budget -= r.chunk
			c := float64(r.chunk)
			g.T += c
			g.pairs += c*float64(r.prefilled) + c*(c+1)/2
		}
		g.seqs++
		g.rows++
		members = append(members, r)
	}
	return g, members, rest
}

// simFlight is a micro-batch in the ring: its sequences, when its rows are
// back at the head, and the head's work then.
type simFlight struct {
	members []*simSeq
	ret     float64
	back    cpuWork
}

// simRing is the ring's clocks: the head's (one goroutine dispatches and
// completes micro-batches in turn, as parallel/stage_sched.go's pipeStep),
// when each other stage is next free, and busy time per resource.
type simRing struct {
	p      *cpuPipeline
	now    float64
	free   []float64
	flight []*simFlight
	busy   []float64       // work per stage, alone
	svc    []float64       // wall time per stage, shared cores included
	core   map[int]float64 // core-seconds per machine
}

func newSimRing(p *cpuPipeline) *simRing {
	S := len(p.splits) - 1
	return &simRing{p: p, free: make([]float64, S), busy: make([]float64, S), svc: make([]float64, S), core: map[int]float64{}}
}

// service is stage s's wall time for work w with n micro-batches in the
// ring. Stages of one machine that run at once share its cores; how often
// the others run is their busy fraction so far (a mean-field estimate: the
// simulation does not know the head's next actions when a stage starts).
func (r *simRing) service(s int, w cpuWork, n int) float64 {
	k := 1.0
	if n > 1 && r.now > 0 {
		for o, m := range r.p.machines {
			if o != s && m == r.p.machines[s] {
				k += min(1, r.svc[o]/r.now)
			}
		}
	}
	t := max(w.alone, w.core*k/r.p.spec.parallelCores())
	r.busy[s] += w.alone
	r.svc[s] += t
	r.core[r.p.machines[s]] += w.core
	return t
}

// dispatch runs the head's front part of g and sends it round the stages,
// each taking it when done with the micro-batches before it.
func (r *simRing) dispatch(g cpuBatch, members []*simSeq) {
	p := r.p
	S := len(p.splits) - 1
	n := len(r.flight) + 1
	f := &simFlight{members: members, back: cpuBack(p.spec, p.cfg, g)}
	r.now += r.service(0, cpuFront(p.spec, p.cfg, p.splits[0], p.splits[1], true, g), n)
	at := r.now
	if S > 1 {
		hop := p.spec.hop(g.T * float64(p.cfg.HiddenSize) * 4) // f32 rows
		r.core[p.machines[0]] += hop.core
		at += hop.alone
		for s := 1; s < S; s++ {
			start := max(at, r.free[s])
			r.free[s] = start + r.service(s, cpuFront(p.spec, p.cfg, p.splits[s], p.splits[s+1], false, g), n)
			r.core[p.machines[s]] += hop.core
			at = r.free[s] + hop.alone
		}
	}
	f.ret = at
	r.flight = append(r.flight, f)
}

// complete waits for the oldest micro-batch's rows and runs the head's
// back part; it returns the micro-batch.
func (r *simRing) complete() *simFlight {
	f := r.flight[0]
	n := len(r.flight)
	r.flight = r.flight[1:]
	r.now = max(r.now, f.ret)
	r.now += r.service(0, f.back, n)
	return f
}

// bottleneck names the busiest resource over a run of dur seconds.
func (r *simRing) bottleneck(dur float64) (string, float64) {
	why, frac := "", 0.0
	for s, b := range r.busy {
		if b/dur > frac {
			why, frac = fmt.Sprintf("stage %d", s), b/dur
		}
	}
	cores := r.p.spec.parallelCores()
	for m := 0; m < len(r.p.machines); m++ { // machines are numbered from 0, in stage order
		c := r.core[m]
		if c/cores/dur > frac {
			why, frac = fmt.Sprintf("machine %d's %.1f effective cores", m, cores), c/cores/dur
		}
	}
	return why, frac
}

// simulate runs the closed-loop benchmark event by event and reports what
// the benchmark would: output tokens over the duration, mean TTFT, and mean
// TPOT ((latency − TTFT) / (output − 1) per request). The head dispatches
// micro-batches while the ring has room and sequences wait, else completes
// the oldest (as the engine does); a stage takes a micro-batch when done
// with the ones before it, so one micro-batch's prefill delays the decode
// steps queued behind it, which TPOT counts.
func (p *cpuPipeline) simulate(sh ServeShape) (ServePrediction, error) {
	if err := p.validate(); err != nil {
		return ServePrediction{}, err
	}
	if sh.NumPrompts < 1 || sh.InputLen < 1 || sh.OutputLen < 1 || sh.Concurrency < 0 {
		return ServePrediction{}, fmt.Errorf("serve shape %+v: prompts, input and output lengths must be positive", sh)
	}
	if sh.NumPrompts > 1<<16 || sh.InputLen+sh.OutputLen > 1<<20 {
		return ServePrediction{}, fmt.Errorf("serve shape %+v is too large to simulate", sh)
	}
	conc := sh.Concurrency
	if conc == 0 || conc > sh.NumPrompts {
		conc = sh.NumPrompts
	}
	in, out := sh.InputLen, sh.OutputLen
	ring := newSimRing(p)
	var (
		ttft, tpot    float64
		waiting, idle []*simSeq // sent but not admitted; admitted but not in the ring
		running       int
		sent, done    int
		steps         int
	)
	arrive := func() {
		for sent-done < conc && sent < sh.NumPrompts {
			waiting = append(waiting, &simSeq{start: ring.now})
			sent++
		}
		for running < p.maxSeqs && len(waiting) > 0 {
			idle, waiting = append(idle, waiting[0]), waiting[1:]
			running++
		}
	}
	arrive()
	for done < sh.NumPrompts {
		if len(ring.flight) < p.micro && len(idle) > 0 {
			g, members, rest := p.form(idle, (running+p.micro-1)/p.micro, in)
			if len(members) > 0 {
				idle = rest
				ring.dispatch(g, members)
				continue
			}
		}
		if len(ring.flight) == 0 {
			return ServePrediction{}, errors.New("cpu pipeline: no progress (prefill budget 0?)")
		}
		f := ring.complete()
		steps++
		now := ring.now
		for _, r := range f.members {
			switch {
			case r.prefilled >= in:
				r.generated++
			default:
				r.prefilled += r.chunk
				if r.prefilled == in {
					r.first, r.generated = now, 1
				}
			}
			if r.generated < out {
				idle = append(idle, r)
				continue
			}
			done++
			running--
			ttft += r.first - r.start
			if out > 1 {
				tpot += (now - r.first) / float64(out-1)
			}
		}
		arrive()
	}
	n, now := float64(sh.NumPrompts), ring.now
	res := ServePrediction{ServeShape: sh, DurationS: now, Steps: steps,
		OutputTokensPerS: n * float64(out) / now, TotalTokensPerS: n * float64(in+out) / now,
		MeanTTFTMs: ttft / n * 1e3, MeanTPOTMs: tpot / n * 1e3}
	res.Bottleneck, res.BottleneckFraction = ring.bottleneck(now)
	return res, nil
}

// decode is the steady decode of batch sequences at mean context ctx: the
// round time and its bound.
func (p *cpuPipeline) decode(batch int, ctx float64) (float64, string) {
	m := min(p.micro, batch)
	gs := make([]cpuBatch, 0, m)
	for left := batch; left > 0; {
		b := float64(min(left, (batch+m-1)/m))
		gs = append(gs, cpuBatch{T: b, seqs: b, pairs: b * ctx, rows: b})
		left -= int(b)
	}
	return p.round(gs)
}

// prefill is the time to first token of one prompt of n tokens on an idle
// pipeline, in prefill-budget chunks.
func (p *cpuPipeline) prefill(n int) float64 {
	var t float64
	for done := 0; done < n; {
		c := float64(min(p.budget, n-done))
		d, _ := p.round([]cpuBatch{{T: c, seqs: 1, pairs: c*float64(done) + c*(c+1)/2, rows: 1}})
		t += d
		done += int(c)
	}
	return t
}

// stageTimes is each stage's time for one decode micro-batch of b sequences.
func (p *cpuPipeline) stageTimes(b int, ctx float64) []float64 {
	S := len(p.splits) - 1
	out := make([]float64, S)
	g := cpuBatch{T: float64(b), seqs: float64(b), pairs: float64(b) * ctx, rows: float64(b)}
	for s := range out {
		out[s] = cpuStage(p.spec, p.cfg, p.splits[s], p.splits[s+1], s == 0, g).alone
	}
	return out
}

// evenSplits is how the node daemons split layers over hosts without GPUs
// (node.EvenSplitPlanner): as evenly as possible, earlier stages taking the
// remainder.
func evenSplits(layers, stages int) []int {
	out := make([]int, stages+1)
	per, extra := layers/stages, layers%stages
	for s := 0; s < stages; s++ {
		n := per
		if s < extra {
			n++
		}
		out[s+1] = out[s] + n
	}
	return out
}

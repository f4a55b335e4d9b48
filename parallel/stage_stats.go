package parallel

import (
	"sync"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"

	"github.com/glmtopo/glmtopo/transport"
)

// StepStats are one pipeline stage's counters since it started, the same
// for the head (Ring.StepStats) and an executor (Stage.StepStats), so that
// `glmtopo status` can set the stages side by side.
type StepStats struct {
	// Steps counts the steps that carried hidden rows through the stage
	// (not the ring's configuration, not the steps that only free blocks);
	// every stage of a healthy ring counts the same.
	Steps int64
	// Tokens sums those steps' rows: prompt chunks plus decode tokens.
	Tokens int64
	// Busy sums the stage's own compute per step; StepP50 and StepP99 are
	// quantiles of it. An executor's is its layers. The head's is its half
	// of the step around the ring: batch, embedding, its layers and the
	// send, then the final norm, lm_head and sampling (stage_sched.go), not
	// the wait for the other stages.
	Busy             time.Duration
	StepP50, StepP99 time.Duration
	// Idle is the time the stage waited for its input with nothing to run:
	// an executor waiting for the previous stage's rows, the head waiting
	// for the last stage's answer. With S stages busy in turn it is the
	// pipeline's bubble; with no requests an executor's grows too.
	Idle time.Duration
}

// stepRecorder keeps StepStats; safe for concurrent use (the stage's
// goroutines record, status reads). The zero value is ready.
type stepRecorder struct {
	mu     sync.Mutex
	steps  int64
	tokens int64
	busy   time.Duration
	idle   time.Duration
	hist   *hdrhistogram.Histogram // step compute, µs
}

// stepHistMaxUS bounds the histogram: a step of over 100 s is recorded
// as 100 s (hdrhistogram drops values above its range).
const stepHistMaxUS = 100_000_000

// step records one step of tokens rows that kept the stage busy for busy.
func (r *stepRecorder) step(tokens int, busy time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.hist == nil {
		r.hist = hdrhistogram.New(1, stepHistMaxUS, 3) // 1 µs … 100 s, 3 significant digits
	}
	r.steps++
	r.tokens += int64(tokens)
	r.busy += busy
	r.hist.RecordValue(min(max(1, busy.Microseconds()), stepHistMaxUS))
}

// count records a step whose compute time is unknown.
func (r *stepRecorder) count(tokens int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.steps++
	r.tokens += int64(tokens)
}

// wait records time spent waiting for input.
func (r *stepRecorder) wait(d time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.idle += d
}

func (r *stepRecorder) snapshot() StepStats {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := StepStats{Steps: r.steps, Tokens: r.tokens, Busy: r.busy, Idle: r.idle}
	if r.hist != nil {
		s.StepP50 = time.Duration(r.hist.ValueAtQuantile(50)) * time.Microsecond
		s.StepP99 = time.Duration(r.hist.ValueAtQuantile(99)) * time.Microsecond
	}
	return s
}

// stepRows is the number of hidden rows a step's header announces.
func stepRows(seqs []transport.SeqMeta) int {
	n := 0
	for _, m := range seqs {
		n += int(m.Tokens)
	}
	return n
}

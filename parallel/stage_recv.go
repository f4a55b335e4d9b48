package parallel

import (
	"context"
	"sync"
	"time"

	"github.com/glmtopo/glmtopo/transport"
)

// With several micro-batches in flight the head must read the last
// stage's answers while it writes the next micro-batch: a link carries a
// message larger than the sockets' buffers only while its reader runs, so
// a head that wrote micro-batch 2 before reading micro-batch 1's rows
// would wait on a stage that waits on the head (each blocked in a write).
// ringReceiver reads the return link on its own goroutine, always, into a
// queue as deep as the micro-batches that may be in flight: the ring's
// answers never wait on the head's sends.

// ringAnswer is one message from the last stage, or the error that ended
// the reading.
type ringAnswer struct {
	m   *transport.Message
	err error
	at  time.Time // when it was read
}

type ringReceiver struct {
	in      transport.Link
	rows    rowMover                // readies each buffer before a read
	answers chan ringAnswer         // read, not yet taken by Ring.recv
	free    chan *transport.Message // buffers Ring.recv is done with
	cancel  context.CancelFunc
	done    chan struct{}
}

// startRingReceiver reads in until it fails or stop is called. depth is
// the most answers outstanding at once (the micro-batches in flight): the
// queue holds them all, so the goroutine never blocks the link. Each
// buffer is attached to mv (a device receive buffer for device rows).
func startRingReceiver(in transport.Link, depth int, mv rowMover) (*ringReceiver, error) {
	depth = max(depth, 1) + 1
	rr := &ringReceiver{in: in, rows: mv, answers: make(chan ringAnswer, depth), free: make(chan *transport.Message, depth),
		done: make(chan struct{})}
	for range depth {
		m := &transport.Message{}
		if err := mv.attach(m); err != nil {
			return nil, err
		}
		rr.free <- m
	}
	ctx, cancel := context.WithCancel(context.Background())
	rr.cancel = cancel
	go rr.run(ctx)
	return rr, nil
}

func (rr *ringReceiver) run(ctx context.Context) {
	defer close(rr.done)
	for {
		var m *transport.Message
		select {
		case m = <-rr.free:
		case <-ctx.Done():
			return
		}
		rr.rows.prepare(m)
		err := rr.in.Recv(ctx, m)
		a := ringAnswer{m: m, err: err, at: time.Now()}
		if err != nil {
			a.m = nil
		}
		select {
		case rr.answers <- a:
		case <-ctx.Done():
			return
		}
		if err != nil {
			return
		}
	}
}

// next waits up to timeout for the next answer. A timeout leaves the
// goroutine reading (the ring is broken then and stop ends it).
func (rr *ringReceiver) next(timeout time.Duration) (ringAnswer, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case a := <-rr.answers:
		if a.err != nil {
			// Keep the error for any later call as well.
			rr.answers <- a
		}
		return a, a.err
	case <-t.C:
		return ringAnswer{}, context.DeadlineExceeded
	}
}

// release hands a message's buffers back for the next read.
func (rr *ringReceiver) release(m *transport.Message) {
	if m != nil {
		rr.free <- m
	}
}

// stop ends the goroutine (closing the link is the caller's) and waits
// for it; a second call returns at once.
func (rr *ringReceiver) stop() {
	rr.cancel()
	<-rr.done
}

// StageStats are an executor stage's counters: where its time went.
type StageStats struct {
	Steps  int64         // steps with hidden rows run (not the configuration, not header-only steps)
	Tokens int64         // those steps' rows
	Busy   time.Duration // running its layers
	// StepP50 and StepP99 are quantiles of a step's time in its layers.
	StepP50, StepP99 time.Duration
	// Idle is the time it waited for its next input with nothing to run:
	// the stage's bubble.
	Idle time.Duration
	// RecvWait sums the reads of its input link (from the start of a read
	// to the message's arrival), overlapped with running and writing.
	RecvWait time.Duration
}

type stageStats struct {
	rec      stepRecorder
	mu       sync.Mutex
	recvWait time.Duration
}

// ran records a step of tokens rows that ran for busy.
func (t *stageStats) ran(tokens int, busy time.Duration) { t.rec.step(tokens, busy) }

func (t *stageStats) received(wait time.Duration) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.recvWait += wait
}

// Stats returns the stage's counters; safe while it serves.
func (s *Stage) Stats() StageStats {
	st := s.stats.rec.snapshot()
	s.stats.mu.Lock()
	defer s.stats.mu.Unlock()
	return StageStats{Steps: st.Steps, Tokens: st.Tokens, Busy: st.Busy, StepP50: st.StepP50, StepP99: st.StepP99,
		Idle: st.Idle, RecvWait: s.stats.recvWait}
}

// StepStats returns the stage's counters in the form the head's share
// (Ring.StepStats); safe while it serves.
func (s *Stage) StepStats() StepStats { return s.stats.rec.snapshot() }

package transport

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/glmtopo/glmtopo/transport/telemetry"
)

// Pipe returns the two ends of an in-process link. Messages are copied (the
// sender may reuse its buffers when Send returns); at most maxInFlight
// payload bytes wait in the pipe per direction, beyond which Send blocks.
// Device payloads are not supported.
func Pipe(nameA, nameB string, maxInFlight int64, lim Limits) (Link, Link) {
	ab := newQueue(maxInFlight)
	ba := newQueue(maxInFlight)
	a := &pipeEnd{peer: nameB, out: ab, in: ba, lim: lim, stats: telemetry.NewLinkStats("inproc", nameB)}
	b := &pipeEnd{peer: nameA, out: ba, in: ab, lim: lim, stats: telemetry.NewLinkStats("inproc", nameA)}
	return a, b
}

type pipeEnd struct {
	peer     string
	out, in  *queue
	lim      Limits
	stats    *telemetry.LinkStats
	lastStep uint64
	recvMu   sync.Mutex
}

// queue is a FIFO bounded by bytes, with a closed flag; cond-free so waits
// can honour contexts: each change signals a channel that is replaced.
type queue struct {
	mu      sync.Mutex
	items   []*Message
	bytes   int64
	max     int64
	closed  bool
	changed chan struct{}
}

func newQueue(max int64) *queue { return &queue{max: max, changed: make(chan struct{})} }

func (q *queue) notifyLocked() {
	close(q.changed)
	q.changed = make(chan struct{})
}

func (q *queue) put(ctx context.Context, m *Message, n int64) error {
	if n > q.max {
		return fmt.Errorf("message of %d bytes exceeds the link's %d in-flight bytes", n, q.max)
	}
	for {
		q.mu.Lock()
		if q.closed {
			q.mu.Unlock()
			return ErrClosed
		}
		if q.bytes+n <= q.max {
			q.items = append(q.items, m)
			q.bytes += n
			q.notifyLocked()
			q.mu.Unlock()
			return nil
		}
		ch := q.changed
		q.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (q *queue) take(ctx context.Context) (*Message, int64, error) {
	for {
		q.mu.Lock()
		if len(q.items) > 0 {
			m := q.items[0]
			q.items[0] = nil
			q.items = q.items[1:]
			var n int64
			for i := range m.Payloads {
				n += int64(len(m.Payloads[i].Host))
			}
			q.bytes -= n
			q.notifyLocked()
			q.mu.Unlock()
			return m, n, nil
		}
		if q.closed {
			q.mu.Unlock()
			return nil, 0, ErrClosed
		}
		ch := q.changed
		q.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		}
	}
}

func (q *queue) close() {
	q.mu.Lock()
	if !q.closed {
		q.closed = true
		q.notifyLocked()
	}
	q.mu.Unlock()
}

func (p *pipeEnd) Peer() string                { return p.peer }
func (p *pipeEnd) Stats() *telemetry.LinkStats { return p.stats }

func (p *pipeEnd) Send(ctx context.Context, m *Message) error {
	start := time.Now()
	fail := func(err error) error {
		return &Error{Op: "send", Peer: p.peer, Step: m.Header.Step, StepSet: true, Err: err}
	}
	n, err := m.PayloadBytes(p.lim)
	if err != nil {
		return fail(err)
	}
	c := &Message{Header: cloneHeader(&m.Header), Payloads: make([]Buffer, len(m.Payloads))}
	for i := range m.Payloads {
		if m.Payloads[i].Dev != 0 {
			return fail(fmt.Errorf("payload %d: device memory over an in-process link", i))
		}
		c.Payloads[i].Host = append([]byte(nil), m.Payloads[i].Host...)
	}
	if err := p.out.put(ctx, c, n); err != nil {
		return fail(err)
	}
	p.stats.Sent(n, time.Since(start))
	return nil
}

func (p *pipeEnd) Recv(ctx context.Context, m *Message) error {
	p.recvMu.Lock()
	defer p.recvMu.Unlock()
	start := time.Now()
	c, n, err := p.in.take(ctx)
	if err != nil {
		return &Error{Op: "recv", Peer: p.peer, Step: p.lastStep, Err: err}
	}
	m.Header = c.Header
	m.Payloads = grow(m.Payloads, len(c.Payloads))
	for i := range c.Payloads {
		if m.Payloads[i].Dev != 0 {
			return &Error{Op: "recv", Peer: p.peer, Step: c.Header.Step, StepSet: true, Err: fmt.Errorf("payload %d: device memory over an in-process link", i)}
		}
		m.Payloads[i].Host = append(m.Payloads[i].Host[:0], c.Payloads[i].Host...)
	}
	p.lastStep = c.Header.Step
	p.stats.Received(n, time.Since(start))
	return nil
}

// Close closes both directions: the peer's pending and later Recvs fail
// once the queued messages are drained.
func (p *pipeEnd) Close() error {
	p.out.close()
	p.in.close()
	return nil
}

func cloneHeader(h *Header) Header {
	c := *h
	c.Tensors = append([]TensorMeta(nil), h.Tensors...)
	for i := range c.Tensors {
		c.Tensors[i].Shape = append([]int64(nil), h.Tensors[i].Shape...)
	}
	c.Seqs = append([]SeqMeta(nil), h.Seqs...)
	for i := range c.Seqs {
		c.Seqs[i].NewBlocks = append([]int32(nil), h.Seqs[i].NewBlocks...)
		c.Seqs[i].FreedBlocks = append([]int32(nil), h.Seqs[i].FreedBlocks...)
	}
	return c
}

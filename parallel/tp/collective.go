package tp

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
)

// fate is one step's shared outcome: the first error any rank reports (or
// the step's context ending) ends every rank's waits at once, so a failed
// rank never leaves its peers blocked in a collective.
type fate struct {
	ctx  context.Context
	once sync.Once
	err  error
	done chan struct{}
}

func newFate(ctx context.Context) *fate { return &fate{ctx: ctx, done: make(chan struct{})} }

func (f *fate) fail(err error) {
	f.once.Do(func() { f.err = err; close(f.done) })
}

// Err is the step's first error, nil while none.
func (f *fate) Err() error {
	select {
	case <-f.done:
		return f.err
	default:
		return nil
	}
}

// hub is an in-process collective among size members. Each call is one
// round: members deposit their parts, the last to arrive combines them in
// member order (so every member gets the same bits, whatever the arrival
// order), and every member waits for that result — for at most timeout,
// and no longer than the step's fate allows. The all-reduce and the
// exchanges (exchange.go) share the rounds, so a member calling another
// operation than its peers fails the round instead of mixing parts.
type hub struct {
	size    int
	timeout time.Duration
	fate    *fate
	names   []int // the members' global ranks, for errors
	mu      sync.Mutex
	cur     *round
	seq     int
}

type round struct {
	seq     int
	ops     []string
	parts   []any
	arrived int
	out     any
	err     error
	done    chan struct{}
}

func newHub(members []int, timeout time.Duration, f *fate) *hub {
	h := &hub{size: len(members), timeout: timeout, fate: f, names: members}
	h.cur = h.newRound()
	return h
}

func (h *hub) newRound() *round {
	h.seq++
	return &round{seq: h.seq, ops: make([]string, h.size), parts: make([]any, h.size), done: make(chan struct{})}
}

// allReduce deposits member m's part x (which it gives up) and returns the
// sum, shared read-only by every member.
func (h *hub) allReduce(m int, x []float32) ([]float32, error) {
	out, err := h.meet(m, "all-reduce", x, h.add)
	if err != nil {
		return nil, err
	}
	return out.([]float32), nil
}

// meet deposits member m's part of operation op and waits for the round's
// result: combine, run by the last member to arrive, over every part.
func (h *hub) meet(m int, op string, part any, combine func(seq int, parts []any) (any, error)) (any, error) {
	if err := h.fate.Err(); err != nil {
		return nil, err
	}
	h.mu.Lock()
	r := h.cur
	if r.parts[m] != nil {
		h.mu.Unlock()
		return nil, fmt.Errorf("%s %d: rank %d joined twice", op, r.seq, h.names[m])
	}
	r.parts[m], r.ops[m] = part, op
	r.arrived++
	if r.arrived == h.size {
		if r.err = h.sameOp(r); r.err == nil {
			r.out, r.err = combine(r.seq, r.parts)
		}
		close(r.done)
		h.cur = h.newRound()
	}
	h.mu.Unlock()
	timer := time.NewTimer(h.timeout)
	defer timer.Stop()
	select {
	case <-r.done:
		if r.err != nil {
			h.fate.fail(r.err)
		}
		return r.out, r.err
	case <-h.fate.done:
		return nil, h.fate.err
	case <-h.fate.ctx.Done():
		err := fmt.Errorf("%s %d: rank %d: %w", op, r.seq, h.names[m], h.fate.ctx.Err())
		h.fate.fail(err)
		return nil, err
	case <-timer.C:
		err := fmt.Errorf("%s %d: rank %d waited %v for ranks %v", op, r.seq, h.names[m], h.timeout, h.missing(r))
		h.fate.fail(err)
		return nil, err
	}
}

// sameOp refuses a round whose members called different operations (a
// rank out of step with its peers).
func (h *hub) sameOp(r *round) error {
	for m, op := range r.ops {
		if op != r.ops[0] {
			return fmt.Errorf("round %d: rank %d called %s, rank %d called %s", r.seq, h.names[0], r.ops[0], h.names[m], op)
		}
	}
	return nil
}

// add sums the round's parts in member order, checking they agree in size
// (NCCL would hang on a mismatch; here it is an error naming the ranks).
func (h *hub) add(seq int, parts []any) (any, error) {
	p0 := parts[0].([]float32)
	for m, p := range parts {
		if n := len(p.([]float32)); n != len(p0) {
			return nil, fmt.Errorf("all-reduce %d: rank %d gave %d values, rank %d gave %d", seq, h.names[0], len(p0), h.names[m], n)
		}
	}
	sum := append([]float32(nil), p0...)
	for _, p := range parts[1:] {
		for i, v := range p.([]float32) {
			sum[i] += v
		}
	}
	return sum, nil
}

func (h *hub) missing(r *round) []int {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []int
	for m, p := range r.parts {
		if p == nil {
			out = append(out, h.names[m])
		}
	}
	return out
}

// comm is one rank's kernels.Collective over a hub: its tensor goes
// through the host (Download/Upload), so it works on any backend.
type comm struct {
	hub    *hub
	member int
	be     kernels.Backend
}

var _ kernels.Collective = (*comm)(nil)

func (c *comm) Size() int { return c.hub.size }
func (c *comm) Rank() int { return c.member }

func (c *comm) AllReduceSum(t *kernels.Tensor) error {
	if t.DType != kernels.F32 {
		return fmt.Errorf("all-reduce of a %v tensor: want f32", t.DType)
	}
	x, err := c.be.Download(t)
	if err != nil {
		return err
	}
	sum, err := c.hub.allReduce(c.member, x)
	if err != nil {
		return err
	}
	return c.be.Upload(t, f32Bytes(sum))
}

func f32Bytes(v []float32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return b
}

var _ kernels.Broadcaster = (*comm)(nil)

// Broadcast replaces t on every member with member root's t (through the
// host, like AllReduceSum).
func (c *comm) Broadcast(t *kernels.Tensor, root int) error {
	if t.DType != kernels.F32 {
		return fmt.Errorf("broadcast of a %v tensor: want f32", t.DType)
	}
	if root < 0 || root >= c.hub.size {
		err := fmt.Errorf("broadcast from rank %d of %d", root, c.hub.size)
		c.hub.fate.fail(err) // its peers must not wait for it
		return err
	}
	part := []float32{} // the others' parts are not read, but must be there
	if c.member == root {
		x, err := c.be.Download(t)
		if err != nil {
			c.hub.fate.fail(err)
			return err
		}
		part = x
	}
	out, err := c.hub.meet(c.member, fmt.Sprintf("broadcast from %d", root), part, func(_ int, parts []any) (any, error) {
		return parts[root], nil
	})
	if err != nil {
		return err
	}
	if c.member == root {
		return nil
	}
	x := out.([]float32)
	if len(x) != t.Elements() {
		return fmt.Errorf("broadcast from rank %d: %d values for a tensor of %d", c.hub.names[root], len(x), t.Elements())
	}
	return c.be.Upload(t, f32Bytes(x))
}

package parallel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/glmtopo/glmtopo/transport"
)

// ServeStage runs st on what arrives on in and passes the results to out:
// the ring configuration (checked, the stage's range appended), then steps.
// The last stage (its range ends at the model's last layer) answers with
// the final hidden rows, which go back to the head. It returns nil when in
// closes (the head ended the ring) and the first error otherwise, having
// closed out so that the failure travels round the ring at once.
//
// Reading, running and writing are three goroutines joined by one-deep
// queues: the stage reads step n+1 and runs it while step n's rows are
// being written, so a write that waits on a slow reader downstream never
// stops this stage's reads (with several micro-batches in flight the
// head's sends and this stage's answers would otherwise wait on each
// other once a message outgrows the sockets' buffers). At most
// stageBuffers messages are held at once.
func ServeStage(ctx context.Context, st *Stage, in, out transport.Link) (err error) {
	return serveStage(ctx, st, in, out, &hostRows{be: st.BE})
}

// serveStage is ServeStage with the rows in host or device payloads (mv):
// a ring of device rows (LinkNCCL) is set up by serveRing (stage_link.go),
// which hands the links over here once the configuration is round.
func serveStage(ctx context.Context, st *Stage, in, out transport.Link, mv rowMover) (err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	p := &stagePump{st: st, in: in, out: out, rows: mv, toRun: make(chan *transport.Message, 1),
		toSend: make(chan *transport.Message, 1), free: make(chan *transport.Message, stageBuffers)}
	for range stageBuffers {
		m := &transport.Message{}
		if err := mv.attach(m); err != nil {
			return fmt.Errorf("stage %s: %w", st.name(), err)
		}
		p.free <- m
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); p.fail(p.read(ctx)); cancelIfErr(p, cancel) }()
	go func() { defer wg.Done(); p.fail(p.write(ctx)); cancelIfErr(p, cancel) }()
	p.fail(p.run(ctx))
	cancelIfErr(p, cancel)
	close(p.toSend) // nothing more to write: the writer drains and returns
	wg.Wait()
	if err := p.firstErr(); err != nil {
		out.Close()
		in.Close()
		return err
	}
	return nil
}

// stageBuffers is how many messages a stage holds: one being read, one
// waiting to run, one running, one being written.
const stageBuffers = 4

type stagePump struct {
	st            *Stage
	in, out       transport.Link
	rows          rowMover
	toRun, toSend chan *transport.Message
	free          chan *transport.Message
	mu            sync.Mutex
	err           error
}

func (p *stagePump) fail(err error) {
	if err == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.err == nil {
		p.err = err
	}
}

func (p *stagePump) firstErr() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// cancelIfErr stops the other goroutines once one has failed; the links
// are closed too, so that a write blocked on a peer that stopped reading
// returns.
func cancelIfErr(p *stagePump, cancel context.CancelFunc) {
	if p.firstErr() != nil {
		cancel()
		p.out.Close()
		p.in.Close()
	}
}

// read receives messages into free buffers and queues them to run; the
// head closing the ring ends it with toRun closed and no error.
func (p *stagePump) read(ctx context.Context) error {
	defer close(p.toRun)
	for {
		var m *transport.Message
		select {
		case m = <-p.free:
		case <-ctx.Done():
			return nil
		}
		waitStart := time.Now()
		p.rows.prepare(m)
		if err := p.in.Recv(ctx, m); err != nil {
			if errors.Is(err, transport.ErrClosed) || errors.Is(err, io.EOF) || ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("stage %s: %w", p.st.name(), err)
		}
		p.st.stats.received(time.Since(waitStart))
		select {
		case p.toRun <- m:
		case <-ctx.Done():
			return nil
		}
	}
}

// run executes the queued messages in order.
func (p *stagePump) run(ctx context.Context) error {
	_, end := p.st.Layers()
	last := end == p.st.Cfg.NumHiddenLayers
	for {
		idle := time.Now()
		var m *transport.Message
		select {
		case m = <-p.toRun:
		case <-ctx.Done():
			return nil
		}
		if m == nil {
			return nil // the head closed the ring
		}
		busy := time.Now()
		p.st.stats.rec.wait(busy.Sub(idle))
		rows := m.Header.Kind == transport.KindActivations && len(m.Payloads) > 0
		tokens := stepRows(m.Header.Seqs) // before runMessage: the last stage's answer drops the header's sequences
		if err := p.st.runMessage(m, last, p.rows); err != nil {
			return err
		}
		if rows {
			p.st.stats.ran(tokens, time.Since(busy)) // steps with rows only: not the configuration or frees
		}
		select {
		case p.toSend <- m:
		case <-ctx.Done():
			return nil
		}
	}
}

// write sends the results in order, recycling their buffers.
func (p *stagePump) write(ctx context.Context) error {
	for m := range p.toSend {
		if err := p.out.Send(ctx, m); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("stage %s: %w", p.st.name(), err)
		}
		p.free <- m
	}
	return nil
}

// runMessage applies one message: the ring configuration or a step.
func (s *Stage) runMessage(m *transport.Message, last bool, mv rowMover) error {
	switch m.Header.Kind {
	case transport.KindControl:
		c, err := s.configureMsg(m)
		if err == nil && c.Link == LinkNCCL {
			if _, host := mv.(*hostRows); host {
				// The head would form NCCL communicators next while this
				// stage waits for steps: refuse at once instead.
				err = fmt.Errorf("%w: the head asks for a ring of %s device rows; stage %s serves host rows (ServeStage): serve it with ServeLink",
					ErrStageProtocol, c.Link, s.name())
			}
		}
		return err
	case transport.KindActivations:
		if len(m.Payloads) != len(m.Header.Tensors) {
			return fmt.Errorf("%w: step %d: %d payloads for %d tensors", ErrStageProtocol, m.Header.Step, len(m.Payloads), len(m.Header.Tensors))
		}
		var rows transport.Buffer
		if len(m.Payloads) > 0 {
			rows = m.Payloads[0]
		}
		if err := s.runRows(&m.Header, rows, mv); err != nil {
			return fmt.Errorf("stage %s: %w", s.name(), err)
		}
		if last {
			m.Header.Kind, m.Header.Seqs = transport.KindFinalHidden, nil
		}
		return nil
	default:
		return fmt.Errorf("%w: stage %s got a %v message", ErrStageProtocol, s.name(), m.Header.Kind)
	}
}

func (s *Stage) name() string {
	first, end := s.Layers()
	return fmt.Sprintf("[%d,%d)", first, end)
}

func (s *Stage) configureFrom(m *transport.Message) error {
	_, err := s.configureMsg(m)
	return err
}

// configureMsg configures the stage from a ring configuration message
// and puts the configuration with the stage's range in it, to pass on.
func (s *Stage) configureMsg(m *transport.Message) (*RingConfig, error) {
	if len(m.Payloads) != 1 || m.Payloads[0].Dev != 0 {
		return nil, fmt.Errorf("%w: ring configuration with %d payloads (it travels as host bytes)", ErrStageProtocol, len(m.Payloads))
	}
	c, err := decodeRingConfig(m.Payloads[0].Host)
	if err != nil {
		return nil, err
	}
	if err := s.Configure(c); err != nil {
		return nil, err
	}
	b, err := encodeRingConfig(c)
	if err != nil {
		return nil, err
	}
	m.Payloads[0].Host = b
	m.Header.Tensors = []transport.TensorMeta{{DType: transport.DTypeBytes, Shape: []int64{int64(len(b))}, Bytes: int64(len(b))}}
	return c, nil
}

package parallel

import (
	"context"
	"fmt"
	"net"

	"github.com/glmtopo/glmtopo/transport/tcp"
)

// StageListener is an executor stage's data-plane endpoint: it accepts the
// previous stage's link and dials the next stage's (or, for the last
// stage, the head's).
type StageListener struct {
	acc *tcp.Acceptor
	cfg tcp.Config
}

// ListenStage starts accepting on addr ("host:port"; port 0 picks one).
func ListenStage(addr string, cfg tcp.Config) (*StageListener, error) {
	acc, err := tcp.Listen(addr, cfg)
	if err != nil {
		return nil, fmt.Errorf("stage: listen %s: %w", addr, err)
	}
	return &StageListener{acc: acc, cfg: cfg}, nil
}

// Addr is the address the previous stage dials.
func (l *StageListener) Addr() net.Addr { return l.acc.Addr() }

// Close stops accepting.
func (l *StageListener) Close() error { return l.acc.Close() }

// Serve dials next, accepts the previous stage (both within ctx), and runs
// st until the head ends the ring (nil) or a link or step fails. The rows
// travel as the head's ring configuration says (ServeLink with LinkAuto).
func (l *StageListener) Serve(ctx context.Context, st *Stage, next string) error {
	return l.ServeLink(ctx, st, next, LinkAuto)
}

// ServeLink is Serve with the stage's --pipeline-link: LinkAuto takes the
// head's choice, LinkTCP or LinkNCCL refuse a ring of the other kind.
// NCCL needs the CUDA backend and libnccl (stage_link.go).
func (l *StageListener) ServeLink(ctx context.Context, st *Stage, next string, link PipelineLink) error {
	out, err := tcp.Dial(ctx, next, l.cfg)
	if err != nil {
		return fmt.Errorf("stage %s: dial the next stage: %w", st.name(), err)
	}
	defer out.Close()
	in, err := l.acc.Accept(ctx)
	if err != nil {
		return fmt.Errorf("stage %s: waiting for the previous stage: %w", st.name(), err)
	}
	defer in.Close()
	return serveRing(ctx, st, in, out, link, openNCCLHops)
}

// HeadListener is the head's data-plane endpoint: the last stage dials it
// to close the ring.
type HeadListener = StageListener

// ListenHead starts accepting the last stage's link on addr.
func ListenHead(addr string, cfg tcp.Config) (*HeadListener, error) { return ListenStage(addr, cfg) }

// ConnectRingTCP dials the first executor stage at first, accepts the last
// stage's link on l (within ctx), and attaches the ring to e.
func ConnectRingTCP(ctx context.Context, e *Engine, l *HeadListener, first string, opt RingOptions) (*Ring, error) {
	out, err := tcp.Dial(ctx, first, l.cfg)
	if err != nil {
		return nil, fmt.Errorf("ring: dial the first stage: %w", err)
	}
	in, err := l.acc.Accept(ctx)
	if err != nil {
		out.Close()
		return nil, fmt.Errorf("ring: the last stage did not connect back: %w", err)
	}
	r, err := ConnectRing(ctx, e, out, in, opt)
	if err != nil {
		out.Close()
		in.Close()
		return nil, err
	}
	return r, nil
}

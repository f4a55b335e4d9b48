package parallel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/transport"
)

// A ring of device rows (LinkNCCL) starts as a ring of TCP links: the
// head's configuration goes round on them as host bytes (an NCCL link
// moves device memory only), saying Link and MaxTokens. Then every hop
// forms a two-rank communicator over its TCP link, which goes on carrying
// the headers: the sending end makes the unique id and sends it, the
// receiving end takes it. The head forms its outgoing hop first and its
// incoming one last; each stage forms its incoming hop, then its outgoing
// one. So a hop's two ends are always both forming it, one after the
// other round the ring, and none waits on another hop.

// hopSetupTimeout bounds forming the hops where the caller's context has
// no sooner deadline (NCCL's first init takes seconds).
const hopSetupTimeout = 2 * time.Minute

// resolveLink turns the head's choice into the ring's link: TCP (also for
// ""), NCCL (an error where the backend cannot), or auto.
func resolveLink(be kernels.Backend, want PipelineLink, open devHopsFunc) (PipelineLink, devHops, error) {
	switch want {
	case "", LinkTCP:
		return LinkTCP, nil, nil
	case LinkNCCL, LinkAuto:
	default:
		return "", nil, fmt.Errorf("ring: pipeline link %q: want tcp, nccl or auto", want)
	}
	hops, err := open(be)
	switch {
	case err == nil:
		return LinkNCCL, hops, nil
	case want == LinkNCCL:
		return "", nil, fmt.Errorf("ring: --pipeline-link nccl: %w", err)
	}
	slog.Info("pipeline rows travel on TCP", "reason", err)
	return LinkTCP, nil, nil
}

// headDeviceLinks forms the head's two hops: out (to the first stage),
// then in (from the last).
func headDeviceLinks(ctx context.Context, hops devHops, out, in transport.Link) (dout, din transport.Link, err error) {
	if out == in {
		return nil, nil, errors.New("ring: device rows need one link per direction (the first and the last stage share one)")
	}
	ctx, cancel := context.WithTimeout(ctx, hopSetupTimeout)
	defer cancel()
	if dout, err = hops.hop(ctx, out, true); err != nil {
		return nil, nil, fmt.Errorf("ring: hop to the first stage: %w", err)
	}
	if din, err = hops.hop(ctx, in, false); err != nil {
		dout.Close()
		return nil, nil, fmt.Errorf("ring: hop from the last stage: %w", err)
	}
	return dout, din, nil
}

// serveRing serves st as ServeStage does, with the ring's link settled by
// its configuration (the first message on in): the stage's want (auto:
// whatever the head chose) must agree with it; for LinkNCCL the stage
// forms its hops with open and runs on device rows.
func serveRing(ctx context.Context, st *Stage, in, out transport.Link, want PipelineLink, open devHopsFunc) (err error) {
	defer func() {
		if err != nil { // the failure travels round the ring at once
			out.Close()
			in.Close()
		}
	}()
	var m transport.Message
	if err := in.Recv(ctx, &m); err != nil {
		if errors.Is(err, transport.ErrClosed) || errors.Is(err, io.EOF) || ctx.Err() != nil {
			return nil // the head went away before its configuration
		}
		return fmt.Errorf("stage %s: waiting for the ring configuration: %w", st.name(), err)
	}
	if m.Header.Kind != transport.KindControl {
		return fmt.Errorf("%w: stage %s: a %v message before the ring configuration", ErrStageProtocol, st.name(), m.Header.Kind)
	}
	c, err := st.configureMsg(&m)
	if err != nil {
		return fmt.Errorf("stage %s: %w", st.name(), err)
	}
	link := c.Link
	if link == "" {
		link = LinkTCP
	}
	if want != LinkAuto && want != "" && want != link {
		return fmt.Errorf("%w: stage %s: the head runs a ring of %s links; this stage was started with --pipeline-link %s", ErrStageProtocol, st.name(), link, want)
	}
	if link != LinkNCCL {
		if err := out.Send(ctx, &m); err != nil {
			return fmt.Errorf("stage %s: pass the ring configuration on: %w", st.name(), err)
		}
		return serveStage(ctx, st, in, out, &hostRows{be: st.BE})
	}
	return serveDeviceRows(ctx, st, in, out, c, &m, open)
}

// serveDeviceRows passes the configuration m on, forms the stage's hops
// (in, then out) and serves device rows on them.
func serveDeviceRows(ctx context.Context, st *Stage, in, out transport.Link, c *RingConfig, m *transport.Message, open devHopsFunc) error {
	if c.MaxTokens <= 0 {
		return fmt.Errorf("%w: stage %s: a ring of device rows without MaxTokens", ErrStageProtocol, st.name())
	}
	if st.ranks != nil {
		return fmt.Errorf("stage %s runs its layers on ranks, which take host rows: start the head with --pipeline-link tcp", st.name())
	}
	hops, err := open(st.BE)
	if err != nil {
		return fmt.Errorf("stage %s: the head asks for NCCL links: %w", st.name(), err)
	}
	defer hops.close()
	mv, err := newDeviceRows(st.BE, hops.device(), c.MaxTokens, st.Cfg.HiddenSize)
	if err != nil {
		return err
	}
	defer mv.release()
	if err := out.Send(ctx, m); err != nil {
		return fmt.Errorf("stage %s: pass the ring configuration on: %w", st.name(), err)
	}
	sctx, cancel := context.WithTimeout(ctx, hopSetupTimeout)
	defer cancel()
	din, err := hops.hop(sctx, in, false)
	if err != nil {
		return fmt.Errorf("stage %s: hop from the previous stage: %w", st.name(), err)
	}
	defer din.Close()
	dout, err := hops.hop(sctx, out, true)
	if err != nil {
		return fmt.Errorf("stage %s: hop to the next stage: %w", st.name(), err)
	}
	defer dout.Close()
	slog.Info("pipeline stage on device rows", "stage", st.name(), "max_tokens", c.MaxTokens)
	return serveStage(ctx, st, din, dout, mv)
}

// sendRingConfig sends the configuration round the ring and returns what
// the last stage sends back (every stage's range added).
func sendRingConfig(ctx context.Context, cfg *RingConfig, out, in transport.Link, timeout time.Duration) (*RingConfig, error) {
	b, err := encodeRingConfig(cfg)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	m := &transport.Message{Header: transport.Header{Kind: transport.KindControl,
		Tensors: []transport.TensorMeta{{DType: transport.DTypeBytes, Shape: []int64{int64(len(b))}, Bytes: int64(len(b))}}},
		Payloads: []transport.Buffer{transport.HostBuffer(b)}}
	if err := out.Send(ctx, m); err != nil {
		return nil, fmt.Errorf("ring: send configuration: %w", err)
	}
	var back transport.Message
	if err := in.Recv(ctx, &back); err != nil {
		return nil, fmt.Errorf("ring: configuration did not come back from the last stage: %w", err)
	}
	if back.Header.Kind != transport.KindControl || len(back.Payloads) != 1 {
		return nil, fmt.Errorf("%w: ring: configuration answered by a %v message", ErrStageProtocol, back.Header.Kind)
	}
	return decodeRingConfig(back.Payloads[0].Host)
}

// dropDeviceLinks undoes useDeviceRows when ConnectRing fails after it.
// Closing a device link closes the TCP link under it (the caller closing
// it again is harmless): the stages see the ring end.
func (r *Ring) dropDeviceLinks() {
	if r.closeDev == nil {
		return
	}
	r.out.Close()
	r.in.Close()
	r.closeDev()
	r.closeDev = nil
}

// useDeviceRows forms the head's hops over its TCP links and moves the
// rows in device memory from now on. On failure it frees hops.
func (r *Ring) useDeviceRows(ctx context.Context, hops devHops, maxTokens int) error {
	mv, err := newDeviceRows(r.be, hops.device(), maxTokens, r.hidden)
	if err != nil {
		hops.close()
		return err
	}
	dout, din, err := headDeviceLinks(ctx, hops, r.out, r.in)
	if err != nil {
		hops.close()
		return err
	}
	r.out, r.in, r.rows = dout, din, mv
	r.closeDev = func() {
		mv.release()
		if err := hops.close(); err != nil {
			slog.Warn("ring: closing the device links", "err", err)
		}
	}
	slog.Info("ring on device rows", "link", LinkNCCL, "max_tokens", maxTokens)
	return nil
}

package nccl

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/transport"
	"github.com/glmtopo/glmtopo/transport/telemetry"
)

// Link is a transport.Link whose headers travel on ctl (an authenticated
// TCP link) and whose payloads, all in device memory, go through NCCL.
// Send and Recv each wait for their transfer; they are serialised on one
// stream, so a full-duplex pipeline uses one Link per direction.
type Link struct {
	ctl    transport.Link
	comm   *Comm
	dev    *cuda.Device
	peer   int
	stream uintptr
	lim    transport.Limits
	stats  *telemetry.LinkStats

	mu       sync.Mutex // one NCCL group at a time on the stream
	sendCdc  *transport.Codec
	recvCdc  *transport.Codec
	hdrOut   transport.Message
	hdrIn    transport.Message
	ops      []Op
	lastStep uint64
	rdmaDev  string // the RDMA port NCCL uses, for Wire ("" if none)
	rdmaPort int
}

// SetRDMAPort names the RDMA port this link's traffic crosses (the one
// NCCL_IB_HCA selects), so Wire can read its counters.
func (l *Link) SetRDMAPort(device string, port int) { l.rdmaDev, l.rdmaPort = device, port }

// Wire returns the RDMA port's counters (rdmamap), which count the whole
// port, or nil when no port is set or readable: NET/IB traffic bypasses the
// kernel, so eBPF sees none of it.
func (l *Link) Wire() *telemetry.Wire {
	if l.rdmaDev == "" {
		return nil
	}
	w, err := telemetry.RDMAWire(l.rdmaDev, l.rdmaPort)
	if err != nil {
		return nil
	}
	return w
}

var _ transport.Link = (*Link)(nil)

// NewLink makes a link to peerRank of comm, with its own stream.
func NewLink(ctl transport.Link, comm *Comm, dev *cuda.Device, peerRank int, lim transport.Limits) (*Link, error) {
	s, err := dev.NewStream()
	if err != nil {
		return nil, err
	}
	l := &Link{ctl: ctl, comm: comm, dev: dev, peer: peerRank, stream: s, lim: lim,
		stats:   telemetry.NewLinkStats("nccl", ctl.Peer()),
		sendCdc: transport.NewCodec(lim), recvCdc: transport.NewCodec(lim)}
	l.hdrOut.Header.Kind = transport.KindControl
	l.hdrOut.Header.Tensors = []transport.TensorMeta{{DType: transport.DTypeBytes, Shape: []int64{0}}}
	l.hdrOut.Payloads = []transport.Buffer{{}}
	return l, nil
}

// Peer names the other end.
func (l *Link) Peer() string { return fmt.Sprintf("%s [nccl rank %d]", l.ctl.Peer(), l.peer) }

// Stats returns the link's counters.
func (l *Link) Stats() *telemetry.LinkStats { return l.stats }

// Stream is the CUDA stream the link's transfers run on.
func (l *Link) Stream() uintptr { return l.stream }

func (l *Link) fail(op string, step uint64, set bool, err error) error {
	return &transport.Error{Op: op, Peer: l.Peer(), Step: step, StepSet: set, Err: err}
}

// Send sends m's header on the control link, then its device payloads.
func (l *Link) Send(ctx context.Context, m *transport.Message) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	start := time.Now()
	step := m.Header.Step
	total, err := m.PayloadBytes(l.lim)
	if err != nil {
		return l.fail("send", step, true, err)
	}
	l.ops = l.ops[:0]
	for i := range m.Payloads {
		b := &m.Payloads[i]
		if b.Dev == 0 && b.Bytes > 0 || b.Dev == 0 && len(b.Host) > 0 {
			return l.fail("send", step, true, fmt.Errorf("payload %d is in host memory; an NCCL link moves device memory", i))
		}
		if b.Bytes > 0 {
			l.ops = append(l.ops, Op{Send: true, Buf: b.Dev, Bytes: b.Bytes, Peer: l.peer})
		}
	}
	hdr, err := l.sendCdc.EncodeHeader(&m.Header)
	if err != nil {
		return l.fail("send", step, true, err)
	}
	l.hdrOut.Header.Step = step
	l.hdrOut.Header.Tensors[0].Shape[0] = int64(len(hdr))
	l.hdrOut.Header.Tensors[0].Bytes = int64(len(hdr))
	l.hdrOut.Payloads[0].Host = hdr
	if err := l.ctl.Send(ctx, &l.hdrOut); err != nil {
		return err
	}
	if err := l.transfer(ctx); err != nil {
		return l.fail("send", step, true, err)
	}
	l.stats.Sent(total, time.Since(start))
	return nil
}

func (l *Link) transfer(ctx context.Context) error {
	if len(l.ops) == 0 {
		return nil
	}
	if err := l.comm.Enqueue(ctx, l.stream, l.ops...); err != nil {
		return err
	}
	return l.comm.Wait(ctx, l.stream)
}

// Recv reads a header from the control link, checks every byte count
// against m's device buffers (NCCL would not), and receives the payloads.
// A mismatch aborts the communicator so the sender fails too, instead of
// waiting for a receive that never comes.
func (l *Link) Recv(ctx context.Context, m *transport.Message) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.ctl.Recv(ctx, &l.hdrIn); err != nil {
		return err
	}
	start := time.Now()
	h := &l.hdrIn
	if h.Header.Kind != transport.KindControl || len(h.Payloads) != 1 {
		l.comm.Abort()
		return l.fail("recv", l.lastStep, false, fmt.Errorf("expected a header envelope, got kind %d", h.Header.Kind))
	}
	if err := l.recvCdc.DecodeHeader(h.Payloads[0].Host, &m.Header); err != nil {
		l.comm.Abort()
		return l.fail("recv", h.Header.Step, true, err)
	}
	step := m.Header.Step
	total, err := m.Header.Validate(l.lim)
	if err != nil {
		l.comm.Abort()
		return l.fail("recv", step, true, err)
	}
	if len(m.Payloads) < len(m.Header.Tensors) {
		l.comm.Abort()
		return l.fail("recv", step, true, fmt.Errorf("%d tensors arrive, %d device buffers given", len(m.Header.Tensors), len(m.Payloads)))
	}
	m.Payloads = m.Payloads[:len(m.Header.Tensors)]
	l.ops = l.ops[:0]
	for i, t := range m.Header.Tensors {
		b := &m.Payloads[i]
		if t.Bytes > 0 && (b.Dev == 0 || b.Bytes < t.Bytes) {
			l.comm.Abort()
			return l.fail("recv", step, true, fmt.Errorf("payload %d: %d bytes arrive, the device buffer holds %d", i, t.Bytes, b.Bytes))
		}
		b.Bytes = t.Bytes
		if t.Bytes > 0 {
			l.ops = append(l.ops, Op{Buf: b.Dev, Bytes: t.Bytes, Peer: l.peer})
		}
	}
	if err := l.transfer(ctx); err != nil {
		return l.fail("recv", step, true, err)
	}
	l.lastStep = step
	l.stats.Received(total, time.Since(start))
	return nil
}

// Close frees the stream; the communicator and the control link belong to
// the caller.
func (l *Link) Close() error {
	return l.dev.DestroyStream(l.stream)
}

// ExchangeID hands the communicator's unique id over ctl: the root creates
// it and sends it, the other rank receives it. (Between hosts the node
// control plane carries UniqueID.Bytes the same way.)
func ExchangeID(ctx context.Context, ctl transport.Link, root bool) (UniqueID, error) {
	if root {
		id, err := NewUniqueID()
		if err != nil {
			return id, err
		}
		b := id.Bytes()
		m := &transport.Message{
			Header:   transport.Header{Kind: transport.KindControl, Tensors: []transport.TensorMeta{{DType: transport.DTypeBytes, Shape: []int64{int64(len(b))}, Bytes: int64(len(b))}}},
			Payloads: []transport.Buffer{transport.HostBuffer(b)},
		}
		return id, ctl.Send(ctx, m)
	}
	var m transport.Message
	if err := ctl.Recv(ctx, &m); err != nil {
		return UniqueID{}, err
	}
	if m.Header.Kind != transport.KindControl || len(m.Payloads) != 1 {
		return UniqueID{}, fmt.Errorf("nccl unique id from %s: unexpected message kind %d", ctl.Peer(), m.Header.Kind)
	}
	return ParseUniqueID(m.Payloads[0].Host)
}

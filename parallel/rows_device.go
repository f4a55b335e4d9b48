package parallel

import (
	"context"
	"fmt"
	"strings"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/transport"
)

// PipelineLink says how a ring's hidden rows travel between stages.
type PipelineLink string

const (
	// LinkTCP: host rows on the authenticated TCP links (page-locked
	// buffers where the backend has them). Any backend.
	LinkTCP PipelineLink = "tcp"
	// LinkNCCL: device rows with ncclSend/ncclRecv (InfiniBand/RoCE between
	// hosts), one two-rank communicator per ring hop; the headers stay on
	// the TCP links, which also carry each communicator's unique id.
	LinkNCCL PipelineLink = "nccl"
	// LinkAuto: NCCL where the backend is CUDA and libnccl loads, else
	// TCP. A stage with auto follows the head's choice.
	LinkAuto PipelineLink = "auto"
)

// ParsePipelineLink parses --pipeline-link ("" is auto).
func ParsePipelineLink(s string) (PipelineLink, error) {
	switch l := PipelineLink(strings.ToLower(strings.TrimSpace(s))); l {
	case "":
		return LinkAuto, nil
	case LinkTCP, LinkNCCL, LinkAuto:
		return l, nil
	}
	return "", fmt.Errorf("pipeline link %q: want tcp, nccl or auto", s)
}

// rowDevice is what device rows need of a backend (kernels/cuda.Backend
// has it all): tensors' device addresses and views, a copy between device
// addresses queued on the backend's stream, and a wait for that stream.
type rowDevice interface {
	kernels.Viewer
	DevicePointer(t *kernels.Tensor) (uintptr, error)
	CopyDevice(dst, src uintptr, n int64) error
	Sync() error
}

// devHops makes the device links of a process's ring hops: NCCL
// (stage_nccl.go), or a fake in the CPU tests.
type devHops interface {
	device() rowDevice
	// hop makes the device link of the hop whose TCP link is ctl, over it:
	// send says this end sends the rows (it makes the communicator's id
	// and sends it on ctl; the other end receives it).
	hop(ctx context.Context, ctl transport.Link, send bool) (transport.Link, error)
	// close frees the communicators and streams once no goroutine uses
	// the links.
	close() error
}

// devHopsFunc opens a backend's devHops; an error means it has none.
type devHopsFunc func(be kernels.Backend) (devHops, error)

// deviceRows moves rows through device payloads: the head sends a step's
// tensor as it is and copies what returns from a receive buffer into the
// step's tensor; a stage runs its layers in place on a view of the buffer
// its input arrived in, and sends that buffer on. Every receive buffer
// holds the largest step (maxTokens rows).
type deviceRows struct {
	be    kernels.Backend
	dev   rowDevice
	size  int64                       // bytes of a receive buffer
	bufs  map[uintptr]*kernels.Tensor // receive buffers by device address; written only by attach
	owned []*kernels.Tensor
	// raised is what the allocator's cap grew by for the buffers: a head
	// engine caps its backend at its memory plan (memplan.go), which holds
	// no receive buffers; the steps keep the room they were planned with.
	raised int64
}

var _ rowMover = (*deviceRows)(nil)

func newDeviceRows(be kernels.Backend, dev rowDevice, maxTokens, hidden int) (*deviceRows, error) {
	if maxTokens <= 0 || hidden <= 0 {
		return nil, fmt.Errorf("device rows: receive buffers of %d tokens × %d", maxTokens, hidden)
	}
	return &deviceRows{be: be, dev: dev, size: 4 * int64(maxTokens) * int64(hidden), bufs: map[uintptr]*kernels.Tensor{}}, nil
}

func (d *deviceRows) attach(m *transport.Message) error {
	d.raiseLimit(d.size)
	t, err := d.be.NewTensor(kernels.F32, int(d.size/4))
	if err != nil {
		d.raiseLimit(-d.size)
		return fmt.Errorf("device rows: receive buffer of %d bytes: %w", d.size, err)
	}
	p, err := d.dev.DevicePointer(t)
	if err != nil {
		d.be.Free(t)
		return err
	}
	d.owned = append(d.owned, t)
	d.bufs[p] = t
	m.Payloads = append(m.Payloads[:0], transport.Buffer{Dev: p, Bytes: d.size})
	return nil
}

// prepare restores the message's buffer: a receive leaves as many
// payloads as tensors arrived (none for a header-only step) and Bytes the
// size received.
func (d *deviceRows) prepare(m *transport.Message) {
	if cap(m.Payloads) > 0 {
		m.Payloads = m.Payloads[:1]
		m.Payloads[0].Bytes = d.size
	}
}

func (d *deviceRows) payload(t *kernels.Tensor, n int) (transport.Buffer, error) {
	if int64(n) > d.size {
		return transport.Buffer{}, fmt.Errorf("%d bytes of hidden rows; the stages' receive buffers hold %d (RingOptions.MaxTokens)", n, d.size)
	}
	// The link sends on its own stream: the backend's must have finished t.
	if err := d.dev.Sync(); err != nil {
		return transport.Buffer{}, err
	}
	p, err := d.dev.DevicePointer(t)
	if err != nil {
		return transport.Buffer{}, err
	}
	return transport.Buffer{Dev: p, Bytes: int64(n)}, nil
}

func (d *deviceRows) take(t *kernels.Tensor, p transport.Buffer) error {
	if p.Dev == 0 {
		return fmt.Errorf("%w: hidden rows arrived in host memory on a ring of device rows", ErrStageProtocol)
	}
	dst, err := d.dev.DevicePointer(t)
	if err != nil {
		return err
	}
	if err := d.dev.CopyDevice(dst, p.Dev, p.Bytes); err != nil {
		return fmt.Errorf("copy final hidden rows: %w", err)
	}
	// The receiver reuses the buffer once released.
	return d.dev.Sync()
}

func (d *deviceRows) open(p transport.Buffer, T, hidden int) (*kernels.Tensor, error) {
	base, ok := d.bufs[p.Dev]
	if !ok {
		return nil, fmt.Errorf("%w: hidden rows at %#x, not in a receive buffer", ErrStageProtocol, p.Dev)
	}
	return d.dev.View(base, 0, kernels.F32, T, hidden)
}

// store waits for the layers: the link sends the buffer on its own stream.
func (d *deviceRows) store(*kernels.Tensor, transport.Buffer) error { return d.dev.Sync() }

func (d *deviceRows) free(*kernels.Tensor) {} // a view: its buffer stays

func (d *deviceRows) release() {
	for _, t := range d.owned {
		d.be.Free(t)
	}
	d.owned, d.bufs = nil, map[uintptr]*kernels.Tensor{}
	d.raiseLimit(-d.raised)
}

// raiseLimit moves a capped allocator's cap by n bytes (nothing where
// there is no cap: a stage's backend, or an engine already closed).
func (d *deviceRows) raiseLimit(n int64) {
	mm, ok := d.be.(kernels.MemoryManager)
	if !ok {
		return
	}
	if st := mm.MemoryStats(); st.Limit > 0 && st.Limit+n > 0 {
		mm.SetMemoryLimit(st.Limit + n)
		d.raised += n
	}
}

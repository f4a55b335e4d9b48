package parallel

import (
	"fmt"
	"log/slog"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/transport"
)

// Hidden rows cross a link twice per ring step (head → stages → head), as
// f32 little-endian bytes. On a backend with kernels.PinnedRows the message
// buffers are page-locked once and the rows are copied straight into and out
// of them; elsewhere they go through Download and an encode loop. On the
// H200 the pageable path with the loop cost ~1 ms per MiB-sized hop.
//
// A rowMover is where the rows live while they cross: host payloads
// (hostRows, any link) or device payloads (deviceRows, rows_device.go: an
// NCCL link moves device memory only). The ring and the stages are written
// once against it.
type rowMover interface {
	// attach gives a message that a link will receive into its buffers
	// (called before any goroutine uses the mover); prepare readies it
	// again before each receive.
	attach(m *transport.Message) error
	prepare(m *transport.Message)
	// payload makes t's rows (n bytes) a payload to send, once the
	// backend has finished writing them; it stays valid until the next
	// call or until t changes.
	payload(t *kernels.Tensor, n int) (transport.Buffer, error)
	// take copies a received payload into t; p may be reused on return.
	take(t *kernels.Tensor, p transport.Buffer) error
	// open returns a tensor [T, hidden] holding payload p's rows for a
	// stage's layers; store writes the tensor's rows back into p, ready to
	// send; free releases what open made.
	open(p transport.Buffer, T, hidden int) (*kernels.Tensor, error)
	store(t *kernels.Tensor, p transport.Buffer) error
	free(t *kernels.Tensor)
	// release frees the mover's buffers once no link uses them.
	release()
}

// hostRows moves rows through host payloads: the links' own buffers on
// receive, buf (the head's, reused) on send.
type hostRows struct {
	be  kernels.Backend
	buf []byte
}

var _ rowMover = (*hostRows)(nil)

func (h *hostRows) attach(*transport.Message) error { return nil }
func (h *hostRows) prepare(*transport.Message)      {}
func (h *hostRows) release()                        {}

func (h *hostRows) payload(t *kernels.Tensor, n int) (transport.Buffer, error) {
	if cap(h.buf) < n {
		h.buf = make([]byte, n)
	}
	h.buf = h.buf[:n]
	pinRows(h.be, h.buf)
	if err := downloadRows(h.be, h.buf, t); err != nil {
		return transport.Buffer{}, fmt.Errorf("download hidden rows: %w", err)
	}
	return transport.HostBuffer(h.buf), nil
}

func (h *hostRows) take(t *kernels.Tensor, p transport.Buffer) error {
	if p.Dev != 0 {
		return fmt.Errorf("%w: hidden rows arrived in device memory on a ring of host rows", ErrStageProtocol)
	}
	// The receiver reuses the buffer once released: a synchronous copy.
	pinRows(h.be, p.Host)
	if err := uploadRowsSync(h.be, t, p.Host); err != nil {
		return fmt.Errorf("upload final hidden rows: %w", err)
	}
	return nil
}

func (h *hostRows) open(p transport.Buffer, T, hidden int) (*kernels.Tensor, error) {
	t, err := h.be.NewTensor(kernels.F32, T, hidden)
	if err != nil {
		return nil, err
	}
	// p is a message buffer the stage reuses: pinned once, it takes an
	// asynchronous upload, safe since nothing writes it before the
	// download in store, which waits for everything queued before it.
	pinRows(h.be, p.Host)
	if err := h.be.Upload(t, p.Host); err != nil {
		h.be.Free(t)
		return nil, err
	}
	return t, nil
}

func (h *hostRows) store(t *kernels.Tensor, p transport.Buffer) error {
	return downloadRows(h.be, p.Host, t)
}

func (h *hostRows) free(t *kernels.Tensor) { h.be.Free(t) }

// pinRows page-locks b's whole capacity where the backend can. A refusal
// leaves b pageable: slower, not wrong.
func pinRows(be kernels.Backend, b []byte) {
	p, ok := be.(kernels.PinnedRows)
	if !ok || cap(b) == 0 {
		return
	}
	if err := p.PinHost(b[:cap(b)]); err != nil {
		slog.Debug("hidden rows stay pageable", "bytes", cap(b), "err", err)
	}
}

// downloadRows copies F32 tensor t into dst (4 bytes per element).
func downloadRows(be kernels.Backend, dst []byte, t *kernels.Tensor) error {
	if p, ok := be.(kernels.PinnedRows); ok {
		return p.DownloadRaw(dst, t)
	}
	v, err := be.Download(t)
	if err != nil {
		return err
	}
	putF32s(dst, v)
	return nil
}

// uploadRowsSync copies src into t and returns once src may change.
func uploadRowsSync(be kernels.Backend, t *kernels.Tensor, src []byte) error {
	if p, ok := be.(kernels.PinnedRows); ok {
		return p.UploadRaw(t, src)
	}
	return be.Upload(t, src) // the CPU backend copies before it returns
}

package parallel

import (
	"log/slog"

	"github.com/glmtopo/glmtopo/kernels"
)

// Hidden rows cross a link twice per ring step (head → stages → head), as
// f32 little-endian bytes. On a backend with kernels.PinnedRows the message
// buffers are page-locked once and the rows are copied straight into and out
// of them; elsewhere they go through Download and an encode loop. On the
// H200 the pageable path with the loop cost ~1 ms per MiB-sized hop.

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

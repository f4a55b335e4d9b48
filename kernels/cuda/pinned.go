package cuda

import (
	"errors"
	"fmt"
	"unsafe"

	"github.com/glmtopo/glmtopo/kernels"
)

var _ kernels.PinnedRows = (*Backend)(nil)

// PinHost page-locks buf so that copies between it and the device run by
// DMA at full bus speed instead of through the driver's pageable staging
// (a 1 MiB row block: ~40 µs pinned against 150–300 µs pageable). A buffer
// is pinned once; the pins are dropped at Close (the map's pointers keep
// the buffers alive until then, so the GC never recycles pinned memory). A buffer that grew in place
// of a smaller pinned one at the same address is pinned again.
func (b *Backend) PinHost(buf []byte) error {
	if len(buf) == 0 {
		return nil
	}
	p := unsafe.Pointer(&buf[0])
	if n, ok := b.pinned[p]; ok && n >= len(buf) {
		return nil
	}
	if err := b.enter(); err != nil {
		return err
	}
	defer b.leave()
	if _, ok := b.pinned[p]; ok {
		b.d.cuMemHostUnregister(p)
		delete(b.pinned, p)
	}
	if err := b.d.check(b.d.cuMemHostRegister(p, uintptr(len(buf)), 0), "pin host rows"); err != nil {
		return fmt.Errorf("cuda: pin %d host bytes: %w", len(buf), err)
	}
	if b.pinned == nil {
		b.pinned = map[unsafe.Pointer]int{}
	}
	b.pinned[p] = len(buf)
	return nil
}

// DownloadRaw copies F32 tensor t's bytes into dst (little-endian, as the
// device holds them: no conversion) and waits for the copy.
func (b *Backend) DownloadRaw(dst []byte, t *kernels.Tensor) error {
	if t == nil {
		return errors.New("cuda: download of nil tensor")
	}
	if len(dst) != 4*t.Elements() {
		return fmt.Errorf("cuda: download of %v tensor %v into %d bytes", t.DType, t.Shape, len(dst))
	}
	var p unsafe.Pointer
	if len(dst) > 0 {
		p = unsafe.Pointer(&dst[0])
	}
	return b.download(t, kernels.F32, p, t.Elements())
}

// UploadRaw copies src into F32 tensor t and waits for the copy (an Upload
// from a pinned buffer is asynchronous).
func (b *Backend) UploadRaw(t *kernels.Tensor, src []byte) error {
	if t == nil || t.DType != kernels.F32 {
		return fmt.Errorf("cuda: raw upload into %v", t)
	}
	if err := b.Upload(t, src); err != nil {
		return err
	}
	return b.Sync()
}

// unpinAll drops every PinHost pin (Close; the context is current).
func (b *Backend) unpinAll() {
	for p := range b.pinned {
		b.d.cuMemHostUnregister(p)
	}
	b.pinned = nil
}

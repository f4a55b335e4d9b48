package cuda

import (
	"encoding/binary"
	"fmt"
	"strings"
	"unsafe"

	"github.com/glmtopo/glmtopo/kernels"
)

func devBuf(t *kernels.Tensor, what string) (*buf, error) {
	if t == nil {
		return nil, fmt.Errorf("cuda: %s is nil", what)
	}
	bf, ok := t.Impl.(*buf)
	if !ok || bf == nil || bf.ptr == 0 {
		return nil, fmt.Errorf("cuda: %s is not a live CUDA tensor (%T)", what, t.Impl)
	}
	return bf, nil
}

// ptrOf is the device address of t, checking its dtype.
func ptrOf(t *kernels.Tensor, dt kernels.DType, what string) (uintptr, error) {
	bf, err := devBuf(t, what)
	if err != nil {
		return 0, err
	}
	if t.DType != dt {
		return 0, fmt.Errorf("cuda: %s is %v, want %v", what, t.DType, dt)
	}
	return bf.ptr, nil
}

// optPtr is ptrOf for optional F32 tensors (0 when nil).
func optPtr(t *kernels.Tensor, what string) (uintptr, error) {
	if t == nil {
		return 0, nil
	}
	return ptrOf(t, kernels.F32, what)
}

// tensorArgs resolves an op's tensor arguments to device addresses, keeping the
// first error (bufio.Writer's way), so that an op checks them all at once:
//
//	var ta tensorArgs
//	o, xp := ta.ptr(out, kernels.F32, "output"), ta.ptr(x, kernels.F32, "input")
//	if ta.err != nil {
//		return ta.err
//	}
type tensorArgs struct{ err error }

// ptr is ptrOf, or 0 once an argument has failed.
func (a *tensorArgs) ptr(t *kernels.Tensor, dt kernels.DType, what string) uintptr {
	if a.err != nil {
		return 0
	}
	p, err := ptrOf(t, dt, what)
	a.err = err
	return p
}

// opt is optPtr, or 0 once an argument has failed.
func (a *tensorArgs) opt(t *kernels.Tensor, what string) uintptr {
	if a.err != nil {
		return 0
	}
	p, err := optPtr(t, what)
	a.err = err
	return p
}

func (b *Backend) NewTensor(dt kernels.DType, shape ...int) (*kernels.Tensor, error) {
	if dt.Size() == 0 {
		return nil, fmt.Errorf("cuda: unsupported dtype %v", dt)
	}
	n := 1
	for _, d := range shape {
		if d < 0 {
			return nil, fmt.Errorf("cuda: negative dimension in shape %v", shape)
		}
		n *= d
	}
	if err := b.enter(); err != nil {
		return nil, err
	}
	bf, err := b.pool.allocKeep(uintptr(n * dt.Size()))
	b.leave()
	if err != nil {
		return nil, fmt.Errorf("cuda: tensor %v %v: %w", dt, shape, err)
	}
	return &kernels.Tensor{DType: dt, Shape: append([]int(nil), shape...), Impl: bf}, nil
}

func (b *Backend) Free(t *kernels.Tensor) {
	if t == nil {
		return
	}
	if bf, ok := t.Impl.(*buf); ok {
		b.pool.put(bf)
	}
	t.Impl = nil
	if t.Scale != nil {
		b.Free(t.Scale)
	}
}

func (b *Backend) Upload(t *kernels.Tensor, data []byte) error {
	bf, err := devBuf(t, "upload target")
	if err != nil {
		return err
	}
	if len(data) != t.Elements()*t.DType.Size() {
		return fmt.Errorf("cuda: upload %d bytes into %v tensor %v (%d bytes)", len(data), t.DType, t.Shape, t.Elements()*t.DType.Size())
	}
	if len(data) == 0 {
		return nil
	}
	if b.capturing {
		return fmt.Errorf("cuda: upload from host memory during graph capture")
	}
	if err := b.enter(); err != nil {
		return err
	}
	defer b.leave()
	if len(data) >= registerMinBytes && !b.opt.PageableUploads {
		if ok, err := b.uploadRegistered(bf.ptr, data); ok || err != nil {
			return err
		}
	}
	return b.d.check(b.d.cuMemcpyHtoDAsync(bf.ptr, unsafe.Pointer(&data[0]), uintptr(len(data)), b.stream), "upload")
}

// registerMinBytes is the smallest upload that page-locks its source:
// weights, not per-step metadata.
const registerMinBytes = 8 << 20

// cuMemHostRegister flags: read-only (a memory-mapped checkpoint is mapped
// read-only) and none.
const hostRegisterReadOnly = 0x08

// uploadRegistered page-locks data (read-only first: checkpoints are
// mapped read-only; then plain), copies it by DMA and unlocks it after the
// copy. A pageable copy goes through the driver's own staging buffers.
// It reports false, having done nothing, where the driver refuses the range.
func (b *Backend) uploadRegistered(dst uintptr, data []byte) (bool, error) {
	p := unsafe.Pointer(&data[0])
	n := uintptr(len(data))
	if b.d.cuMemHostRegister(p, n, hostRegisterReadOnly) != 0 && b.d.cuMemHostRegister(p, n, 0) != 0 {
		return false, nil
	}
	err := b.d.check(b.d.cuMemcpyHtoDAsync(dst, p, n, b.stream), "upload")
	if err == nil {
		err = b.d.check(b.d.cuStreamSynchronize(b.stream), "upload")
	}
	if uerr := b.d.check(b.d.cuMemHostUnregister(p), "unregister upload source"); err == nil {
		err = uerr
	}
	return true, err
}

// UploadWeight copies a weight to the device. 1-D BF16 vectors (norms,
// biases) become F32, as on the CPU backend, since the kernels read them so.
func (b *Backend) UploadWeight(dt kernels.DType, shape []int, data []byte) (*kernels.Tensor, error) {
	n := 1
	for _, d := range shape {
		n *= d
	}
	if len(data) != n*dt.Size() {
		return nil, fmt.Errorf("cuda: weight %v %v needs %d bytes, got %d", dt, shape, n*dt.Size(), len(data))
	}
	if dt == kernels.BF16 && len(shape) == 1 {
		f := make([]byte, 4*n)
		for i := 0; i < n; i++ {
			binary.LittleEndian.PutUint32(f[4*i:], uint32(binary.LittleEndian.Uint16(data[2*i:]))<<16)
		}
		dt, data = kernels.F32, f
	}
	switch dt {
	case kernels.F32, kernels.BF16, kernels.F8E4M3, kernels.I32:
	default:
		return nil, fmt.Errorf("cuda: unsupported weight dtype %v", dt)
	}
	t, err := b.NewTensor(dt, shape...)
	if err != nil {
		return nil, err
	}
	if err := b.Upload(t, data); err != nil {
		b.Free(t)
		return nil, err
	}
	return t, nil
}

// Sync waits for the stream and reports any error a kernel flagged
// (out-of-range token ids, KV slots or expert ids).
func (b *Backend) Sync() error {
	if err := b.enter(); err != nil {
		return err
	}
	defer b.leave()
	return b.syncLocked()
}

func (b *Backend) syncLocked() error {
	if err := b.d.check(b.d.cuStreamSynchronize(b.stream), "synchronize"); err != nil {
		return err
	}
	var flag [1]uint32
	if err := b.d.check(b.d.cuMemcpyDtoHAsync(unsafe.Pointer(&flag[0]), b.errFlag.ptr, 4, b.stream), "read error flag"); err != nil {
		return err
	}
	if err := b.d.check(b.d.cuStreamSynchronize(b.stream), "synchronize"); err != nil {
		return err
	}
	if flag[0] == 0 {
		return nil
	}
	b.d.cuMemsetD32Async(b.errFlag.ptr, 0, 1, b.stream)
	var what []string
	if flag[0]&1 != 0 {
		what = append(what, "a token id outside the vocabulary (embedding)")
	}
	if flag[0]&2 != 0 {
		what = append(what, "a KV cache slot outside the cache")
	}
	if flag[0]&4 != 0 {
		what = append(what, "an expert id outside the expert list")
	}
	return fmt.Errorf("cuda: a kernel saw %s", strings.Join(what, "; "))
}

func (b *Backend) download(t *kernels.Tensor, dt kernels.DType, dst unsafe.Pointer, n int) error {
	bf, err := devBuf(t, "download source")
	if err != nil {
		return err
	}
	if t.DType != dt {
		return fmt.Errorf("cuda: download of %v tensor: want %v", t.DType, dt)
	}
	if err := b.enter(); err != nil {
		return err
	}
	defer b.leave()
	if n > 0 {
		if err := b.d.check(b.d.cuMemcpyDtoHAsync(dst, bf.ptr, uintptr(n*dt.Size()), b.stream), "download"); err != nil {
			return err
		}
	}
	return b.syncLocked()
}

func (b *Backend) Download(t *kernels.Tensor) ([]float32, error) {
	if t == nil {
		return nil, fmt.Errorf("cuda: download of nil tensor")
	}
	out := make([]float32, t.Elements())
	var p unsafe.Pointer
	if len(out) > 0 {
		p = unsafe.Pointer(&out[0])
	}
	if err := b.download(t, kernels.F32, p, len(out)); err != nil {
		return nil, err
	}
	return out, nil
}

func (b *Backend) DownloadI32(t *kernels.Tensor) ([]int32, error) {
	if t == nil {
		return nil, fmt.Errorf("cuda: download of nil tensor")
	}
	out := make([]int32, t.Elements())
	var p unsafe.Pointer
	if len(out) > 0 {
		p = unsafe.Pointer(&out[0])
	}
	if err := b.download(t, kernels.I32, p, len(out)); err != nil {
		return nil, err
	}
	return out, nil
}

// DownloadBytes copies any tensor's raw bytes (BF16 caches, FP8 weights) to the host.
func (b *Backend) DownloadBytes(t *kernels.Tensor) ([]byte, error) {
	if t == nil {
		return nil, fmt.Errorf("cuda: download of nil tensor")
	}
	out := make([]byte, t.Elements()*t.DType.Size())
	var p unsafe.Pointer
	if len(out) > 0 {
		p = unsafe.Pointer(&out[0])
	}
	if err := b.download(t, t.DType, p, t.Elements()); err != nil {
		return nil, err
	}
	return out, nil
}

// batchMeta is a Batch in device memory: one I32 array holding positions,
// sequence indices, slots and the block tables (padded to a common width).
type batchMeta struct {
	b                                  *kernels.Batch
	dev                                uintptr
	pos, seq, slots, tables, stride, T int
	maxCtx                             int
	own                                *buf // NewBatchMeta's buffer
	// Prefill tiles: (first token, count) of up to 16 consecutive tokens of
	// one sequence, at offset tiles+stride... (see uploadBatch).
	tileOff, nTiles int
}

func (m *batchMeta) Tokens() int { return m.T }

func (b *Backend) UploadBatch(batch *kernels.Batch) (kernels.BatchMeta, error) {
	return b.uploadBatch(batch, false)
}

// NewBatchMeta uploads a batch into its own device buffer (UploadBatch
// reuses a small ring), for a captured graph that replays it after
// UpdateBatch. Free it with FreeBatchMeta once the graph is gone.
func (b *Backend) NewBatchMeta(batch *kernels.Batch) (kernels.BatchMeta, error) {
	return b.uploadBatch(batch, true)
}

// FreeBatchMeta releases a NewBatchMeta buffer.
func (b *Backend) FreeBatchMeta(meta kernels.BatchMeta) {
	if m, ok := meta.(*batchMeta); ok && m.own != nil {
		b.pool.put(m.own)
		m.own, m.dev = nil, 0
	}
}

func (b *Backend) uploadBatch(batch *kernels.Batch, own bool) (kernels.BatchMeta, error) {
	T := batch.Tokens()
	if len(batch.SeqIndex) != T || len(batch.Slots) != T || len(batch.BlockTables) != len(batch.ContextLens) {
		return nil, fmt.Errorf("cuda: inconsistent batch")
	}
	stride := 1
	maxCtx := 0
	for i, t := range batch.BlockTables {
		stride = max(stride, len(t))
		maxCtx = max(maxCtx, int(batch.ContextLens[i]))
	}
	S := len(batch.BlockTables)
	tiles := prefillTiles(batch)
	n := 3*T + S*stride + len(tiles)
	host := make([]int32, n)
	copy(host[0:], batch.Positions)
	copy(host[T:], batch.SeqIndex)
	copy(host[2*T:], batch.Slots)
	for i, t := range batch.BlockTables {
		copy(host[3*T+i*stride:], t)
	}
	copy(host[3*T+S*stride:], tiles)
	m := &batchMeta{b: batch, pos: 0, seq: T, slots: 2 * T, tables: 3 * T, stride: stride, T: T, maxCtx: maxCtx,
		tileOff: 3*T + S*stride, nTiles: len(tiles) / 2}
	if b.capturing {
		return nil, fmt.Errorf("cuda: batch upload during graph capture")
	}
	if err := b.enter(); err != nil {
		return nil, err
	}
	defer b.leave()
	if own {
		bf, err := b.pool.allocKeep(uintptr(4 * max(n, 1)))
		if err != nil {
			return nil, err
		}
		m.own, m.dev = bf, bf.ptr
		return m, b.d.check(b.d.cuMemcpyHtoDAsync(m.dev, unsafe.Pointer(&host[0]), uintptr(4*n), b.stream), "upload batch")
	}
	// A ring of buffers: a step's kernels read its buffer while the next
	// step's batch is uploaded (the stream orders the copy after them anyway).
	i := b.metaNext % len(b.metas)
	b.metaNext++
	need := uintptr(4 * max(n, 1))
	if b.metas[i] == nil || b.metas[i].size < need {
		b.pool.put(b.metas[i])
		// At least 256 KiB (a 2048-token step over 16 sequences of 9216
		// tokens takes 64 KiB), so that the ring is allocated once, at the
		// engine's warm-up, not on the serving path.
		bf, err := b.pool.allocKeep(max(need, 256<<10))
		if err != nil {
			return nil, err
		}
		b.metas[i] = bf
	}
	m.dev = b.metas[i].ptr
	if err := b.d.check(b.d.cuMemcpyHtoDAsync(m.dev, unsafe.Pointer(&host[0]), uintptr(4*n), b.stream), "upload batch"); err != nil {
		return nil, err
	}
	return m, nil
}

func (m *batchMeta) at(off int) uintptr { return m.dev + uintptr(4*off) }

// prefillTiles cuts the batch into runs of up to 16 consecutive tokens of
// one sequence at consecutive positions: (first token, count) pairs.
func prefillTiles(b *kernels.Batch) []int32 {
	var out []int32
	T := b.Tokens()
	for t := 0; t < T; {
		n := 1
		for n < 16 && t+n < T && b.SeqIndex[t+n] == b.SeqIndex[t] && b.Positions[t+n] == b.Positions[t+n-1]+1 {
			n++
		}
		out = append(out, int32(t), int32(n))
		t += n
	}
	return out
}

package nccl

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cuda"
)

// StagingBackend is what a TensorAllReducer needs of its backend to run the
// host-staged exchanges (kernels.Exchanger): device tensors to stage host
// slices in, and the copies. kernels/cuda.Backend has them all; Download
// and DownloadI32 synchronise the stream, which the exchange only calls
// once Wait has seen the NCCL work done (so they never block on a peer).
type StagingBackend interface {
	TensorBackend
	NewTensor(dt kernels.DType, shape ...int) (*kernels.Tensor, error)
	Free(t *kernels.Tensor)
	Upload(t *kernels.Tensor, data []byte) error
	Download(t *kernels.Tensor) ([]float32, error)
	DownloadI32(t *kernels.Tensor) ([]int32, error)
}

var (
	_ StagingBackend    = (*cuda.Backend)(nil)
	_ kernels.Exchanger = (*TensorAllReducer)(nil)
)

// AllToAllV sends send[p] to rank p and returns what each rank sent this
// one (kernels.Exchanger), staged through device memory: the counts go
// first (an ncclAllGather of every rank's row of per-peer counts, so each
// rank sizes its receives from the very numbers its peers send by), then
// the values in one group of ncclSend/ncclRecv, then the results come back
// to the host. It waits for completion; the whole exchange is bounded by
// the reducer's timeout (SetEnqueueTimeout), and a failure aborts the
// communicator so that the other ranks' calls fail too instead of waiting.
// One rank returns send without NCCL.
func (a *TensorAllReducer) AllToAllV(send [][]float32) ([][]float32, error) {
	ctx, cancel := context.WithTimeout(context.Background(), a.timeout)
	defer cancel()
	return a.AllToAllVContext(ctx, send)
}

// AllToAllVContext is AllToAllV bounded by ctx.
func (a *TensorAllReducer) AllToAllVContext(ctx context.Context, send [][]float32) ([][]float32, error) {
	n := a.Size()
	if len(send) != n {
		return nil, fmt.Errorf("nccl all-to-all-v: %d parts for %d ranks", len(send), n)
	}
	if n == 1 {
		return [][]float32{send[0]}, nil
	}
	row := make([]int64, n)
	var total int
	for p, s := range send {
		row[p] = int64(len(s))
		total += len(s)
	}
	packed := make([]float32, 0, total)
	for _, s := range send {
		packed = append(packed, s...)
	}
	recv, counts, err := a.exchange(ctx, "nccl all-to-all-v", packed, row, nil)
	if err != nil {
		return nil, err
	}
	out := make([][]float32, n)
	var off int64
	for p, c := range counts {
		out[p] = recv[off : off+c : off+c]
		off += c
	}
	return out, nil
}

// AllGatherV returns every rank's part concatenated in rank order
// (kernels.Exchanger): an exchange like AllToAllV's in which each rank
// sends its one part to every rank, itself included. One rank returns part.
func (a *TensorAllReducer) AllGatherV(part []float32) ([]float32, error) {
	ctx, cancel := context.WithTimeout(context.Background(), a.timeout)
	defer cancel()
	return a.AllGatherVContext(ctx, part)
}

// AllGatherVContext is AllGatherV bounded by ctx.
func (a *TensorAllReducer) AllGatherVContext(ctx context.Context, part []float32) ([]float32, error) {
	n := a.Size()
	if n == 1 {
		return part, nil
	}
	row := make([]int64, n)
	for p := range row {
		row[p] = int64(len(part))
	}
	// Every peer's block starts at the part's first element.
	recv, _, err := a.exchange(ctx, "nccl all-gather-v", part, row, make([]int64, n))
	return recv, err
}

// exchange runs a staged all-to-all-v: sendCounts[p] elements of packed at
// sendDispls[p] (nil: packed in rank order) go to rank p. It returns what
// arrived, packed in rank order, and how much came from each rank. Any
// failure aborts the communicator: the peers are in the same exchange and
// would otherwise wait for this rank until their deadlines.
func (a *TensorAllReducer) exchange(ctx context.Context, what string, packed []float32, sendCounts, sendDispls []int64) ([]float32, []int64, error) {
	sb, ok := a.b.(StagingBackend)
	if !ok {
		return nil, nil, fmt.Errorf("%s: backend %T cannot stage host data (it needs NewTensor, Free, Upload, Download and DownloadI32)", what, a.b)
	}
	s := &stager{b: sb}
	recv, counts, err := a.stagedExchange(ctx, s, packed, sendCounts, sendDispls)
	if err != nil {
		a.comm.abortBounded()
		// Once NCCL has the buffers, a failed wait may leave its kernels
		// holding them: they are left allocated rather than reused under
		// a transfer (the communicator is dead; the stage is going down).
		if !s.enqueued {
			s.free()
		}
		return nil, nil, fmt.Errorf("%s (rank %d of %d; communicator aborted): %w", what, a.Rank(), a.Size(), err)
	}
	s.free()
	return recv, counts, nil
}

func (a *TensorAllReducer) stagedExchange(ctx context.Context, s *stager, packed []float32, sendCounts, sendDispls []int64) ([]float32, []int64, error) {
	recvCounts, err := a.gatherCounts(ctx, s, sendCounts)
	if err != nil {
		return nil, nil, err
	}
	_, recvTotal := Packed(recvCounts)
	if recvTotal > math.MaxInt32 {
		return nil, nil, fmt.Errorf("%d values to receive: more than one exchange moves", recvTotal)
	}
	sendT, err := s.upload(kernels.F32, f32Bytes(packed), len(packed))
	if err != nil {
		return nil, nil, fmt.Errorf("stage the values: %w", err)
	}
	recvT, err := s.alloc(kernels.F32, int(recvTotal))
	if err != nil {
		return nil, nil, fmt.Errorf("stage the receive buffer: %w", err)
	}
	x := &AllToAllV{DType: Float32, SendCounts: sendCounts, SendDispls: sendDispls, RecvCounts: recvCounts}
	if x.Send, err = s.buffer(sendT); err != nil {
		return nil, nil, err
	}
	if x.Recv, err = s.buffer(recvT); err != nil {
		return nil, nil, err
	}
	stream := a.b.Stream()
	s.enqueued = true
	if err := a.comm.AllToAllV(ctx, stream, x); err != nil {
		return nil, nil, err
	}
	if err := a.comm.Wait(ctx, stream); err != nil {
		return nil, nil, fmt.Errorf("values: %w", err)
	}
	got, err := s.b.Download(recvT)
	if err != nil {
		return nil, nil, fmt.Errorf("download the values: %w", err)
	}
	return got[:recvTotal:recvTotal], recvCounts, nil
}

// gatherCounts all-gathers every rank's row of per-peer counts (int64,
// carried in I32 tensors: two words each) and returns how many values
// each rank will send this one. The row that comes back for this rank must
// be the one it sent, and every count must be a length.
func (a *TensorAllReducer) gatherCounts(ctx context.Context, s *stager, row []int64) ([]int64, error) {
	n, rank := a.Size(), a.Rank()
	mine := make([]byte, 8*n)
	for p, c := range row {
		binary.LittleEndian.PutUint64(mine[8*p:], uint64(c))
	}
	rowT, err := s.upload(kernels.I32, mine, 2*n)
	if err != nil {
		return nil, fmt.Errorf("stage the counts: %w", err)
	}
	allT, err := s.alloc(kernels.I32, 2*n*n)
	if err != nil {
		return nil, fmt.Errorf("stage the counts: %w", err)
	}
	rb, err := s.buffer(rowT)
	if err != nil {
		return nil, err
	}
	ab, err := s.buffer(allT)
	if err != nil {
		return nil, err
	}
	stream := a.b.Stream()
	s.enqueued = true
	if err := a.comm.AllGather(ctx, stream, rb, ab, int64(n), Int64); err != nil {
		return nil, fmt.Errorf("counts: %w", err)
	}
	if err := a.comm.Wait(ctx, stream); err != nil {
		return nil, fmt.Errorf("counts: %w", err)
	}
	words, err := s.b.DownloadI32(allT)
	if err != nil {
		return nil, fmt.Errorf("download the counts: %w", err)
	}
	return recvCounts(words, row, n, rank)
}

// recvCounts reads the gathered count matrix (rank r's row at r*n, each
// count two little-endian int32 words) and returns column rank.
func recvCounts(words []int32, row []int64, n, rank int) ([]int64, error) {
	if len(words) != 2*n*n {
		return nil, fmt.Errorf("counts: %d words gathered, want %d", len(words), 2*n*n)
	}
	at := func(r, p int) int64 {
		i := 2 * (r*n + p)
		return int64(uint64(uint32(words[i])) | uint64(uint32(words[i+1]))<<32)
	}
	for p := range n {
		if got := at(rank, p); got != row[p] {
			return nil, fmt.Errorf("counts: this rank's gathered count for rank %d is %d, but it sends %d", p, got, row[p])
		}
	}
	out := make([]int64, n)
	for r := range n {
		c := at(r, rank)
		if c < 0 || c > math.MaxInt32 {
			return nil, fmt.Errorf("counts: rank %d announced %d values for rank %d", r, c, rank)
		}
		out[r] = c
	}
	return out, nil
}

// stager owns the device tensors of one exchange.
type stager struct {
	b        StagingBackend
	tensors  []*kernels.Tensor
	enqueued bool // NCCL has been handed the tensors
}

// alloc makes a tensor of n elements (at least one: a zero-length
// allocation has no address to hand NCCL).
func (s *stager) alloc(dt kernels.DType, n int) (*kernels.Tensor, error) {
	t, err := s.b.NewTensor(dt, max(n, 1))
	if err != nil {
		return nil, err
	}
	s.tensors = append(s.tensors, t)
	return t, nil
}

// upload makes a tensor of n elements holding data (n*size bytes).
func (s *stager) upload(dt kernels.DType, data []byte, n int) (*kernels.Tensor, error) {
	t, err := s.alloc(dt, n)
	if err != nil {
		return nil, err
	}
	if n == 0 {
		return t, nil
	}
	view := *t // same storage, exactly n elements: Upload checks the length
	view.Shape = []int{n}
	return t, s.b.Upload(&view, data)
}

// buffer is t's device memory for a Comm call.
func (s *stager) buffer(t *kernels.Tensor) (Buffer, error) {
	p, err := s.b.DevicePointer(t)
	if err != nil {
		return Buffer{}, err
	}
	if p == 0 {
		return Buffer{}, errors.New("staging tensor without a device address")
	}
	return Buffer{Ptr: p, Bytes: int64(t.Elements() * t.DType.Size())}, nil
}

// free returns the tensors to the backend. Each exchange waited for its
// stream's work, so nothing still reads or writes them.
func (s *stager) free() {
	for _, t := range s.tensors {
		s.b.Free(t)
	}
}

// f32Bytes is v as little-endian bytes (the backends' Upload format).
func f32Bytes(v []float32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return b
}

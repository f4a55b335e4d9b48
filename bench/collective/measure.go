package collectivebench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/transport/nccl"
)

// runChild is one rank: it joins the communicator, measures, and prints
// its report as JSON on stdout for the parent to merge.
func runChild(ctx context.Context, o Options, spec string, stdout io.Writer) error {
	c, err := parseChildSpec(spec)
	if err != nil {
		return err
	}
	dev, err := cuda.OpenDevice(c.device)
	if err != nil {
		return fmt.Errorf("rank %d: %w", c.rank, err)
	}
	defer dev.Close()
	comm, err := nccl.InitRank(ctx, dev, c.id, c.nranks, c.rank)
	if err != nil {
		return err
	}
	defer comm.Close()
	rep, err := measure(ctx, o, dev, comm)
	if err != nil {
		return fmt.Errorf("rank %d: %w", c.rank, err)
	}
	return json.NewEncoder(stdout).Encode(rep)
}

// rankBuffers are a send and a receive buffer of the largest size, and the
// stream every call runs on.
type rankBuffers struct {
	dev        *cuda.Device
	send, recv nccl.Buffer
	stream     uintptr
}

func newRankBuffers(dev *cuda.Device, bytes int64) (*rankBuffers, error) {
	b := &rankBuffers{dev: dev}
	var err error
	for _, dst := range []*nccl.Buffer{&b.send, &b.recv} {
		if dst.Ptr, err = dev.Alloc(bytes); err != nil {
			b.close()
			return nil, err
		}
		dst.Bytes = bytes
		// Zeros: sums of whatever cuMemAlloc left could be NaN or
		// denormal, and neither should be what is timed.
		if err := dev.CopyToDevice(dst.Ptr, make([]byte, bytes)); err != nil {
			b.close()
			return nil, err
		}
	}
	if b.stream, err = dev.NewStream(); err != nil {
		b.close()
		return nil, err
	}
	return b, nil
}

func (b *rankBuffers) close() {
	for _, p := range []uintptr{b.send.Ptr, b.recv.Ptr} {
		if p != 0 {
			b.dev.Free(p)
		}
	}
	if b.stream != 0 {
		b.dev.DestroyStream(b.stream)
	}
}

// call is one collective at one size, ready to enqueue.
type call func(ctx context.Context) error

// callFor binds op at count elements per rank (per peer for the
// all-to-all-v) to the buffers.
func callFor(comm *nccl.Comm, b *rankBuffers, op string, count int64, d nccl.DType) (call, error) {
	n, es := int64(comm.Size()), d.Size()
	part := func(buf nccl.Buffer, elems int64) nccl.Buffer { return nccl.Buffer{Ptr: buf.Ptr, Bytes: elems * es} }
	s := b.stream
	switch op {
	case OpAllReduce:
		return func(ctx context.Context) error {
			return comm.AllReduce(ctx, s, part(b.send, count), part(b.recv, count), count, d)
		}, nil
	case OpAllGather:
		return func(ctx context.Context) error {
			return comm.AllGather(ctx, s, part(b.send, count), part(b.recv, count*n), count, d)
		}, nil
	case OpReduceScatter:
		return func(ctx context.Context) error {
			return comm.ReduceScatter(ctx, s, part(b.send, count*n), part(b.recv, count), count, d)
		}, nil
	case OpAllToAllV:
		counts := slices.Repeat([]int64{count}, int(n))
		a := &nccl.AllToAllV{Send: part(b.send, count*n), Recv: part(b.recv, count*n), DType: d, SendCounts: counts, RecvCounts: counts}
		return func(ctx context.Context) error { return comm.AllToAllV(ctx, s, a) }, nil
	}
	return nil, fmt.Errorf("unknown collective %q", op)
}

// measure times every op at every batch on this rank.
func measure(ctx context.Context, o Options, dev *cuda.Device, comm *nccl.Comm) (*Report, error) {
	n := comm.Size()
	maxBytes := int64(0)
	for _, bt := range o.Batches {
		maxBytes = max(maxBytes, int64(bt)*int64(o.Hidden)*o.DType.Size())
	}
	bufs, err := newRankBuffers(dev, maxBytes)
	if err != nil {
		return nil, err
	}
	defer bufs.close()
	rep := &Report{Ranks: n, DType: o.DType.String(), Hidden: o.Hidden}
	for _, op := range o.Ops {
		for _, bt := range o.Batches {
			count, sizeElems := Shape(op, int64(bt)*int64(o.Hidden), n)
			r := Result{Op: op, Phase: phase(bt), Batch: bt, SizeBytes: sizeElems * o.DType.Size(), Count: count}
			fn, err := callFor(comm, bufs, op, count, o.DType)
			if err != nil {
				return nil, err
			}
			iters := itersFor(o, r.SizeBytes)
			lat, err := timeCalls(ctx, comm, bufs.stream, fn, o.Warmup, iters)
			if err != nil {
				return nil, fmt.Errorf("%s of %d bytes: %w", op, r.SizeBytes, err)
			}
			r.P50us, r.P99us = quantile(lat, 0.5), quantile(lat, 0.99)
			if r.QueuedUs, err = timeQueued(ctx, comm, bufs.stream, fn, iters); err != nil {
				return nil, fmt.Errorf("%s of %d bytes, queued: %w", op, r.SizeBytes, err)
			}
			if err := r.bandwidth(n); err != nil {
				return nil, err
			}
			rep.Results = append(rep.Results, r)
		}
	}
	return rep, nil
}

// timeCalls runs warmup untimed calls, then iters timed ones, each from
// enqueue to the stream finishing.
func timeCalls(ctx context.Context, comm *nccl.Comm, stream uintptr, fn call, warmup, iters int) ([]time.Duration, error) {
	lat := make([]time.Duration, 0, iters)
	for i := range warmup + iters {
		t0 := time.Now()
		if err := fn(ctx); err != nil {
			return nil, err
		}
		if err := comm.Wait(ctx, stream); err != nil {
			return nil, err
		}
		if i >= warmup {
			lat = append(lat, time.Since(t0))
		}
	}
	return lat, nil
}

// timeQueued is the mean time of iters calls queued back to back and
// waited for once, in µs.
func timeQueued(ctx context.Context, comm *nccl.Comm, stream uintptr, fn call, iters int) (float64, error) {
	t0 := time.Now()
	for range iters {
		if err := fn(ctx); err != nil {
			return 0, err
		}
	}
	if err := comm.Wait(ctx, stream); err != nil {
		return 0, err
	}
	return float64(time.Since(t0).Nanoseconds()) / 1e3 / float64(max(iters, 1)), nil
}

// quantile is the q-quantile of lat in µs (nearest rank).
func quantile(lat []time.Duration, q float64) float64 {
	if len(lat) == 0 {
		return 0
	}
	s := slices.Clone(lat)
	slices.Sort(s)
	i := min(len(s)-1, int(q*float64(len(s))))
	return float64(s[i].Nanoseconds()) / 1e3
}

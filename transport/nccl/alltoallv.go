package nccl

import (
	"context"
	"fmt"
)

// AllToAllV is one rank's side of an all-to-all with per-peer counts (the
// expert-parallel dispatch and combine): SendCounts[p] elements from
// Send at SendDispls[p] go to rank p, RecvCounts[p] elements from rank p
// land in Recv at RecvDispls[p]. Counts and displacements are elements of
// DType; nil displacements pack the blocks in rank order.
//
// NCCL matches sends to receives but checks no counts: rank p's
// RecvCounts[q] must equal rank q's SendCounts[p] (both ends agree through
// the routing both computed). A mismatch either corrupts the data or
// leaves a transfer waiting, which Wait's deadline turns into an abort.
type AllToAllV struct {
	Send, Recv             Buffer
	DType                  DType
	SendCounts, SendDispls []int64
	RecvCounts, RecvDispls []int64
}

// Packed returns displacements that lay counts' blocks end to end, and
// their total.
func Packed(counts []int64) (displs []int64, total int64) {
	displs = make([]int64, len(counts))
	for i, n := range counts {
		displs[i] = total
		total += n
	}
	return displs, total
}

// side checks one direction's counts and displacements against buf and
// returns the displacements to use and the extent used, in bytes.
func side(buf Buffer, counts, displs []int64, d DType, nranks int, name string) ([]int64, int64, error) {
	what := "nccl all-to-all-v " + name
	if len(counts) != nranks {
		return nil, 0, fmt.Errorf("%s: %d counts for %d ranks", what, len(counts), nranks)
	}
	if displs == nil {
		for p, n := range counts {
			if n < 0 {
				return nil, 0, fmt.Errorf("%s: negative count %d for rank %d", what, n, p)
			}
		}
		displs, _ = Packed(counts)
	}
	if len(displs) != nranks {
		return nil, 0, fmt.Errorf("%s: %d displacements for %d ranks", what, len(displs), nranks)
	}
	var extent int64
	for p := range counts {
		if displs[p] < 0 {
			return nil, 0, fmt.Errorf("%s: negative displacement %d for rank %d", what, displs[p], p)
		}
		n, err := elems(counts[p], d, fmt.Sprintf("%s, rank %d", what, p))
		if err != nil {
			return nil, 0, err
		}
		off, err := elems(displs[p], d, fmt.Sprintf("%s, rank %d displacement", what, p))
		if err != nil {
			return nil, 0, err
		}
		if err := fits(buf, off, n, fmt.Sprintf("%s, rank %d", what, p)); err != nil {
			return nil, 0, err
		}
		if n > 0 {
			extent = max(extent, off+n)
		}
	}
	return displs, extent, nil
}

// check validates a against a communicator of nranks ranks and returns the
// displacements to use.
func (a *AllToAllV) check(nranks int) (sendDispls, recvDispls []int64, err error) {
	if err := checkType(a.DType, false, "nccl all-to-all-v"); err != nil {
		return nil, nil, err
	}
	sendDispls, sendExt, err := side(a.Send, a.SendCounts, a.SendDispls, a.DType, nranks, "send")
	if err != nil {
		return nil, nil, err
	}
	recvDispls, recvExt, err := side(a.Recv, a.RecvCounts, a.RecvDispls, a.DType, nranks, "receive")
	if err != nil {
		return nil, nil, err
	}
	// NCCL's send and receive of a group run concurrently: a rank's
	// receive must not overwrite what it has yet to send.
	if overlap(a.Send.Ptr, sendExt, a.Recv.Ptr, recvExt) {
		return nil, nil, fmt.Errorf("nccl all-to-all-v: the send and receive regions overlap (it does not run in place)")
	}
	return sendDispls, recvDispls, nil
}

// AllToAllV queues a's transfers as one group of ncclSend/ncclRecv on
// stream and returns without waiting (Wait waits; a CUDA graph capture
// records it). Zero counts post nothing (both ends skip them). The block a
// rank sends itself goes through NCCL like the others, so the call is one
// group whatever the routing.
func (c *Comm) AllToAllV(ctx context.Context, stream uintptr, a *AllToAllV) error {
	sd, rd, err := a.check(c.nranks)
	if err != nil {
		return err
	}
	size := a.DType.Size()
	busy := false
	for p := range c.nranks {
		busy = busy || a.SendCounts[p] > 0 || a.RecvCounts[p] > 0
	}
	if !busy {
		return nil
	}
	return c.group(ctx, func() (int32, string) {
		var res int32
		var what string
		note := func(r int32, name string) {
			if r != ncclSuccess && r != ncclInProgress && res == ncclSuccess {
				res, what = r, name
			}
		}
		for p := range c.nranks {
			if n := a.SendCounts[p]; n > 0 {
				note(c.p2p(true, a.Send.Ptr+uintptr(sd[p]*size), n, a.DType, p, stream))
			}
			if n := a.RecvCounts[p]; n > 0 {
				note(c.p2p(false, a.Recv.Ptr+uintptr(rd[p]*size), n, a.DType, p, stream))
			}
		}
		return res, what
	})
}

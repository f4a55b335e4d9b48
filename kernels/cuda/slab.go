package cuda

// Packed weights. cuMemAlloc hands out memory in 2 MiB pages, so a
// GLM-4.5-Air-FP8 expert matrix of 5.5 MiB took 6 MiB and GLM-4.5-FP8's
// 7.5 MiB ones 8 MiB: 17,000 of them wasted 8 GiB that the driver counted
// as used and the pool did not (the engine's "runtime" term, 9.4 GiB on one
// H200, which shrank the KV cache). While packing (kernels.WeightPacker,
// on while the model's weights load), long-lived allocations up to
// slabPieceMax are carved from slabs: one slab holds m pieces of one size,
// m chosen so that the slab is a whole number of pages, or nearly, at most
// slabMax bytes. Weights are not freed and allocated again, so a freed
// piece is not reused: its slab goes back to the driver when its last
// piece is freed.

const (
	driverPage   = 2 << 20
	slabMax      = 64 << 20
	slabPieceMax = 32 << 20
	pieceAlign   = 256
)

// slab is one driver allocation carved into pieces of one size.
type slab struct {
	ptr, size, piece uintptr
	next, live, cap  int // pieces handed out, still live, in all
}

// slabPieces is how many pieces of size s the n-th slab of that size
// holds: the count in [mMax/4, mMax] whose slab wastes the least of its
// last page, the smaller on ties, where mMax fills 2 MiB << n (at most
// slabMax): slabs double, so that a size with few pieces (norms, scales)
// does not leave most of a large slab empty.
func slabPieces(s uintptr, n int) int {
	target := min(uintptr(slabMax), uintptr(driverPage)<<min(n, 16))
	mMax := max(1, int(target/s))
	best, bestWaste := mMax, uintptr(1<<62)
	for m := max(1, mMax/4); m <= mMax; m++ {
		n := uintptr(m) * s
		waste := roundPage(n) - n
		// Compare waste per byte held: waste_m / (m·s) < best / (best·s).
		if waste*uintptr(best) < bestWaste*uintptr(m) {
			best, bestWaste = m, waste
		}
	}
	return best
}

func roundPage(n uintptr) uintptr { return (n + driverPage - 1) &^ (driverPage - 1) }

// fromSlab carves n bytes from the open slab of their size, opening one
// when there is none or it is full.
func (p *pool) fromSlab(n uintptr) (*buf, error) {
	s := (max(n, 1) + pieceAlign - 1) &^ (pieceAlign - 1)
	sl := p.open[s]
	if sl == nil || sl.next == sl.cap {
		m := slabPieces(s, p.slabsOf[s])
		p.slabsOf[s]++
		size := roundPage(uintptr(m) * s)
		m = int(size / s) // the last page's room may hold more
		var ptr uintptr
		if err := p.driverAlloc(&ptr, size); err != nil {
			return nil, err
		}
		p.driverAllocs++
		sl = &slab{ptr: ptr, size: size, piece: s, cap: m}
		p.open[s] = sl
		p.handOut(size) // the whole slab is live: the driver holds all of it
		p.slabBytes += int64(size)
	}
	b := &buf{ptr: sl.ptr + uintptr(sl.next)*s, size: s, slab: sl}
	sl.next++
	sl.live++
	return b, nil
}

// putPiece returns a slab's piece; the slab goes back to the driver with
// its last one.
func (p *pool) putPiece(b *buf) {
	sl := b.slab
	sl.live--
	b.ptr = 0
	if sl.live > 0 || sl.next < sl.cap && p.open[sl.piece] == sl {
		return
	}
	if p.open[sl.piece] == sl {
		delete(p.open, sl.piece)
	}
	if p.memFree(sl.ptr) == 0 {
		p.live -= int64(sl.size)
		p.slabBytes -= int64(sl.size)
	}
}

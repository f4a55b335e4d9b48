package cuda

import (
	"fmt"
	"sort"
)

// buf is a device allocation owned by a tensor (Tensor.Impl).
type buf struct {
	ptr   uintptr
	size  uintptr // rounded size class
	view  bool    // aliases another buf's memory (Backend.View): never freed
	slab  *slab   // a piece of a packed slab (slab.go)
	arena bool    // a piece of the scratch arena (arena.go)
}

// pool is a caching device allocator: freed blocks go to per-size free lists
// and are handed out again without cuMemAlloc/cuMemFree, so the model code
// can allocate its activations every step. One stream orders all work, so a
// block freed after its last kernel was enqueued is safe to reuse at once.
//
// Scratch freed while a CUDA graph is captured stays baked into the graph:
// every replay writes it again. Such blocks go to a separate list that only
// later captures draw from (graphs replay one at a time on the one stream,
// so they may share it), never back to the general lists, where a tensor
// allocated after the capture could land on them and be overwritten by
// each replay.
type pool struct {
	// memAlloc and memFree are cuMemAlloc and cuMemFree (fakes in tests);
	// check turns their results into errors.
	memAlloc  func(p *uintptr, n uintptr) int32
	memFree   func(p uintptr) int32
	check     func(r int32, what string) error
	free      map[uintptr][]uintptr
	graph     map[uintptr][]uintptr // scratch of captured graphs
	capturing bool
	live      int64 // bytes handed out
	cached    int64 // bytes in the free lists
	graphHeld int64 // bytes in the graph scratch lists
	peak      int64 // most live since resetPeak
	// driverAllocs counts cuMemAlloc calls; limit (0: none) caps live +
	// cached + graphHeld (see alloc).
	driverAllocs int64
	limit        int64
	// packing carves long-lived allocations from slabs (slab.go); open is
	// each piece size's slab being filled, slabBytes the slabs' bytes.
	packing   bool
	open      map[uintptr]*slab
	slabsOf   map[uintptr]int // slabs opened per piece size
	slabBytes int64
	// arena, when reserved, serves ops' scratch (arena.go).
	arena *arena
}

func newPool(d *driver) *pool {
	p := &pool{free: map[uintptr][]uintptr{}, graph: map[uintptr][]uintptr{}, open: map[uintptr]*slab{},
		slabsOf: map[uintptr]int{}}
	if d != nil {
		p.memAlloc, p.memFree, p.check = d.cuMemAlloc, d.cuMemFree, d.check
	}
	return p
}

// driverAlloc is cuMemAlloc of n bytes; out of memory, it gives the cached
// blocks back and tries once more.
func (p *pool) driverAlloc(ptr *uintptr, n uintptr) error {
	r := p.memAlloc(ptr, n)
	if r == 0 {
		return nil
	}
	if p.cached == 0 {
		return fmt.Errorf("%w (allocating %d bytes, %d live)", p.check(r, "cuMemAlloc"), n, p.live)
	}
	if err := p.trim(); err != nil {
		return err
	}
	if r := p.memAlloc(ptr, n); r != 0 {
		return fmt.Errorf("%w (allocating %d bytes, %d live)", p.check(r, "cuMemAlloc"), n, p.live)
	}
	return nil
}

// sizeClass rounds n up: 512 B steps below 1 MiB, then whole 2 MiB pages,
// as cuMemAlloc takes them, so that the pool's account is the driver's
// (64 KiB steps hid up to 2 MiB per allocation from the memory plan, where
// it showed up as "runtime"). Weights are packed instead (slab.go); a
// request that misses its class takes a cached block up to an eighth
// larger (fit), so scratch of slowly varying sizes still finds blocks.
func sizeClass(n uintptr) uintptr {
	if n == 0 {
		n = 1
	}
	if n < 1<<20 {
		return (n + 511) &^ 511
	}
	return roundPage(n)
}

// fit is the smallest cached size class in [sz, sz+sz/8] with a free
// block (any larger one when any is set), or 0. Scratch no longer borrows
// any larger block (arena.go says why): the borrower holds all of it.
func (p *pool) fit(sz uintptr, any bool) uintptr {
	best := uintptr(0)
	for s, l := range p.free {
		if len(l) > 0 && s >= sz && (any || s <= sz+sz/8) && (best == 0 || s < best) {
			best = s
		}
	}
	return best
}

func (p *pool) handOut(sz uintptr) {
	p.live += int64(sz)
	p.peak = max(p.peak, p.live)
}

// alloc is for an op's scratch, freed when the op returns: from the
// scratch arena when one is reserved and n fits, else from the caching
// lists.
func (p *pool) alloc(n uintptr) (*buf, error) {
	if p.arena != nil && !p.capturing {
		if b := p.arena.take(n); b != nil {
			return b, nil
		}
	}
	return p.get(n, false)
}

// allocKeep is for memory that outlives the op (tensors, batch metadata,
// expert tables): it never takes a block much larger than it asked for,
// which would keep a large step's scratch from that step.
// While packing, pieces up to slabPieceMax come from slabs.
func (p *pool) allocKeep(n uintptr) (*buf, error) {
	if p.packing && !p.capturing && n <= slabPieceMax {
		return p.fromSlab(n)
	}
	return p.get(n, false)
}

func (p *pool) get(n uintptr, borrow bool) (*buf, error) {
	sz := sizeClass(n)
	if l := p.graph[sz]; p.capturing && len(l) > 0 {
		ptr := l[len(l)-1]
		p.graph[sz] = l[:len(l)-1]
		p.graphHeld -= int64(sz)
		p.handOut(sz)
		return &buf{ptr: ptr, size: sz}, nil
	}
	cls := sz
	if len(p.free[cls]) == 0 {
		if f := p.fit(sz, borrow); f != 0 {
			cls = f
		}
	}
	if l := p.free[cls]; len(l) > 0 {
		ptr := l[len(l)-1]
		p.free[cls] = l[:len(l)-1]
		p.cached -= int64(cls)
		p.handOut(cls)
		return &buf{ptr: ptr, size: cls}, nil
	}
	if p.limit > 0 && p.live+p.cached+p.graphHeld+int64(sz) > p.limit {
		if err := p.release(p.live + p.cached + p.graphHeld + int64(sz) - p.limit); err != nil {
			return nil, err
		}
		if p.live+p.graphHeld+int64(sz) > p.limit {
			return nil, fmt.Errorf("cuda: allocating %d bytes would pass the memory plan's %d-byte limit (%d live): "+
				"the step needs more scratch than the start-up profile measured", sz, p.limit, p.live)
		}
	}
	var ptr uintptr
	if err := p.driverAlloc(&ptr, sz); err != nil {
		return nil, err
	}
	p.driverAllocs++
	p.handOut(sz)
	return &buf{ptr: ptr, size: sz}, nil
}

func (p *pool) put(b *buf) {
	if b == nil || b.ptr == 0 || b.view {
		return
	}
	if b.slab != nil {
		p.putPiece(b)
		return
	}
	if b.arena {
		if p.arena != nil {
			p.arena.give(b)
		}
		return
	}
	if p.capturing {
		p.graph[b.size] = append(p.graph[b.size], b.ptr)
		p.graphHeld += int64(b.size)
	} else {
		p.free[b.size] = append(p.free[b.size], b.ptr)
		p.cached += int64(b.size)
	}
	p.live -= int64(b.size)
	b.ptr = 0
}

// close frees every cached block, the graphs' scratch included (their
// graphs must be gone).
func (p *pool) close() error {
	if p.arena != nil {
		p.arena.stack = nil
		if err := p.reserveScratch(0); err != nil {
			return err
		}
	}
	for s, l := range p.graph {
		for _, ptr := range l {
			if err := p.check(p.memFree(ptr), "cuMemFree"); err != nil {
				return err
			}
			p.graphHeld -= int64(s)
		}
		delete(p.graph, s)
	}
	for s, sl := range p.open { // filled no further; empty ones go back
		delete(p.open, s)
		if sl.live == 0 {
			if err := p.check(p.memFree(sl.ptr), "cuMemFree"); err != nil {
				return err
			}
			p.live -= int64(sl.size)
			p.slabBytes -= int64(sl.size)
		}
	}
	return p.trim()
}

// trim frees every cached block (the caller synchronised the stream or
// relies on cuMemFree's implicit synchronisation).
func (p *pool) trim() error {
	sizes := make([]uintptr, 0, len(p.free))
	for s := range p.free {
		sizes = append(sizes, s)
	}
	sort.Slice(sizes, func(i, j int) bool { return sizes[i] < sizes[j] })
	for _, s := range sizes {
		for _, ptr := range p.free[s] {
			if err := p.check(p.memFree(ptr), "cuMemFree"); err != nil {
				return err
			}
			p.cached -= int64(s)
		}
		delete(p.free, s)
	}
	return nil
}

// release frees cached blocks, largest first, until at least n bytes are
// freed or none is left (the memory limit's trim: a step's scratch of a new
// size class evicts the least number of cached blocks).
func (p *pool) release(n int64) error {
	sizes := make([]uintptr, 0, len(p.free))
	for s := range p.free {
		sizes = append(sizes, s)
	}
	sort.Slice(sizes, func(i, j int) bool { return sizes[i] > sizes[j] })
	for _, s := range sizes {
		l := p.free[s]
		for n > 0 && len(l) > 0 {
			if err := p.check(p.memFree(l[len(l)-1]), "cuMemFree"); err != nil {
				return err
			}
			l = l[:len(l)-1]
			p.cached -= int64(s)
			n -= int64(s)
		}
		p.free[s] = l
		if len(l) == 0 {
			delete(p.free, s)
		}
		if n <= 0 {
			break
		}
	}
	return nil
}

package cuda

import (
	"fmt"
	"sort"
)

// buf is a device allocation owned by a tensor (Tensor.Impl).
type buf struct {
	ptr  uintptr
	size uintptr // rounded size class
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
	d         *driver
	free      map[uintptr][]uintptr
	graph     map[uintptr][]uintptr // scratch of captured graphs
	capturing bool
	live      int64 // bytes handed out
	cached    int64 // bytes in the free lists
	graphHeld int64 // bytes in the graph scratch lists
}

func newPool(d *driver) *pool {
	return &pool{d: d, free: map[uintptr][]uintptr{}, graph: map[uintptr][]uintptr{}}
}

// sizeClass rounds n up: 512 B steps below 1 MiB, then 2 MiB steps, so
// that a step's activations of slowly varying sizes still find blocks.
func sizeClass(n uintptr) uintptr {
	if n == 0 {
		n = 1
	}
	if n < 1<<20 {
		return (n + 511) &^ 511
	}
	return (n + (2<<20 - 1)) &^ (2<<20 - 1)
}

func (p *pool) alloc(n uintptr) (*buf, error) {
	sz := sizeClass(n)
	if l := p.graph[sz]; p.capturing && len(l) > 0 {
		ptr := l[len(l)-1]
		p.graph[sz] = l[:len(l)-1]
		p.graphHeld -= int64(sz)
		p.live += int64(sz)
		return &buf{ptr, sz}, nil
	}
	if l := p.free[sz]; len(l) > 0 {
		ptr := l[len(l)-1]
		p.free[sz] = l[:len(l)-1]
		p.cached -= int64(sz)
		p.live += int64(sz)
		return &buf{ptr, sz}, nil
	}
	var ptr uintptr
	if r := p.d.cuMemAlloc(&ptr, sz); r != 0 {
		// Out of memory: give the cached blocks back and try once more.
		if p.cached == 0 {
			return nil, fmt.Errorf("%w (allocating %d bytes, %d live)", p.d.check(r, "cuMemAlloc"), sz, p.live)
		}
		if err := p.trim(); err != nil {
			return nil, err
		}
		if r := p.d.cuMemAlloc(&ptr, sz); r != 0 {
			return nil, fmt.Errorf("%w (allocating %d bytes, %d live)", p.d.check(r, "cuMemAlloc"), sz, p.live)
		}
	}
	p.live += int64(sz)
	return &buf{ptr, sz}, nil
}

func (p *pool) put(b *buf) {
	if b == nil || b.ptr == 0 {
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
	for s, l := range p.graph {
		for _, ptr := range l {
			if err := p.d.check(p.d.cuMemFree(ptr), "cuMemFree"); err != nil {
				return err
			}
			p.graphHeld -= int64(s)
		}
		delete(p.graph, s)
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
			if err := p.d.check(p.d.cuMemFree(ptr), "cuMemFree"); err != nil {
				return err
			}
			p.cached -= int64(s)
		}
		delete(p.free, s)
	}
	return nil
}

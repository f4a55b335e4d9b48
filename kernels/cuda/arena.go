package cuda

import "fmt"

// The scratch arena. An op's scratch (pool.alloc) lives only while the op
// runs and is freed in reverse order (deferred puts), so once the engine
// has profiled its steps it reserves their scratch peak as one allocation
// (kernels.ScratchReserver) and ops carve their scratch from it as a stack:
// no driver call on the step path, no size classes to miss, and a step
// whose scratch fits what was profiled cannot run out of memory. Caching
// free lists could not promise that: a small request that borrowed a large
// cached block held all of it, and the op's next request then passed the
// memory limit (a 128-token step after a 2048-token profile, H200).
// Scratch past the arena (a path the profile missed) falls back to the
// caching lists; scratch of a graph capture stays with its graph (alloc.go).
type arena struct {
	base *buf
	off  uintptr
	// stack holds the pieces handed out, in order; freed ones are popped
	// when every later one is freed too.
	stack []arenaPiece
}

type arenaPiece struct {
	off, end uintptr
	freed    bool
}

// reserveScratch replaces the arena by one of n bytes (0: none); the old
// one must have no piece out.
func (p *pool) reserveScratch(n uintptr) error {
	if a := p.arena; a != nil {
		if len(a.stack) > 0 {
			return fmt.Errorf("cuda: scratch arena resized with %d pieces out", len(a.stack))
		}
		p.arena = nil
		p.put(a.base)
	}
	if n == 0 {
		return nil
	}
	b, err := p.get(n, false)
	if err != nil {
		return fmt.Errorf("cuda: scratch arena of %d bytes: %w", n, err)
	}
	p.arena = &arena{base: b}
	return nil
}

// take carves n bytes (256-aligned) from the arena, or returns nil
// when they do not fit.
func (a *arena) take(n uintptr) *buf {
	sz := (max(n, 1) + pieceAlign - 1) &^ (pieceAlign - 1)
	if a.off+sz > a.base.size {
		return nil
	}
	b := &buf{ptr: a.base.ptr + a.off, size: sz, arena: true}
	a.stack = append(a.stack, arenaPiece{off: a.off, end: a.off + sz})
	a.off += sz
	return b
}

// give marks b's piece free and pops the freed top of the stack.
func (a *arena) give(b *buf) {
	off := b.ptr - a.base.ptr
	for i := len(a.stack) - 1; i >= 0; i-- {
		if a.stack[i].off == off && !a.stack[i].freed {
			a.stack[i].freed = true
			break
		}
	}
	for len(a.stack) > 0 && a.stack[len(a.stack)-1].freed {
		a.stack = a.stack[:len(a.stack)-1]
	}
	a.off = 0
	if n := len(a.stack); n > 0 {
		a.off = a.stack[n-1].end
	}
	b.ptr = 0
}

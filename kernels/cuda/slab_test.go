package cuda

import (
	"fmt"
	"strings"
	"testing"
)

// fakeDriver hands out addresses as cuMemAlloc would, rounding each
// allocation of 1 MiB or more up to the driver's 2 MiB page (smaller ones
// share pages, to 512 bytes), and counts what the device then holds.
type fakeDriver struct {
	next, used uintptr
	sizes      map[uintptr]uintptr
	allocs     int
}

func newFakePool() (*pool, *fakeDriver) {
	d := &fakeDriver{next: 1 << 40, sizes: map[uintptr]uintptr{}}
	p := newPool(nil)
	p.memAlloc = func(ptr *uintptr, n uintptr) int32 {
		sz := roundPage(n)
		if n < 1<<20 {
			sz = (n + 511) &^ 511
		}
		*ptr = d.next
		d.next += sz
		d.sizes[*ptr] = sz
		d.used += sz
		d.allocs++
		return 0
	}
	p.memFree = func(ptr uintptr) int32 {
		sz, ok := d.sizes[ptr]
		if !ok {
			return 1 // CUDA_ERROR_INVALID_VALUE: not an allocation's start
		}
		delete(d.sizes, ptr)
		d.used -= sz
		return 0
	}
	p.check = func(r int32, what string) error {
		if r != 0 {
			return fmt.Errorf("%s: error %d", what, r)
		}
		return nil
	}
	return p, d
}

// Packed weights take what they ask for, not a page each: GLM-4.5-Air's
// 5.5 MiB expert matrices, their small scales and norms cost the device under 1%
// more than their bytes (a page each wasted 9%, 9 GiB on one H200), the
// pool's live bytes are exactly what the device holds, and freeing every
// weight gives every slab back.
func TestPackedWeightsWasteNoPages(t *testing.T) {
	p, d := newFakePool()
	p.packing = true
	const expert, scale = 1408 * 4096, 11 * 32 * 4
	var bufs []*buf
	var asked uintptr
	for range 3 * 128 * 4 {
		for _, n := range []uintptr{expert, scale} {
			b, err := p.allocKeep(n)
			if err != nil {
				t.Fatal(err)
			}
			bufs = append(bufs, b)
			asked += n
		}
	}
	for range 93 { // norms: few pieces of their size, in a small slab
		b, err := p.allocKeep(4096 * 4)
		if err != nil {
			t.Fatal(err)
		}
		bufs = append(bufs, b)
		asked += 4096 * 4
	}
	p.packing = false
	if waste := float64(d.used-asked) / float64(asked); waste > 0.01 {
		t.Errorf("device holds %d bytes for %d asked: %.1f%% waste", d.used, asked, 100*waste)
	}
	if p.live != int64(d.used) {
		t.Errorf("pool counts %d live bytes, the device holds %d", p.live, d.used)
	}
	seen := map[uintptr]bool{}
	for _, b := range bufs {
		if b.ptr%pieceAlign != 0 || seen[b.ptr] {
			t.Fatalf("piece at %#x: misaligned or handed out twice", b.ptr)
		}
		seen[b.ptr] = true
	}
	for _, b := range bufs {
		p.put(b)
	}
	if err := p.close(); err != nil {
		t.Fatal(err)
	}
	if d.used != 0 || p.live != 0 || p.slabBytes != 0 {
		t.Errorf("after freeing every weight the device holds %d bytes (pool live %d, slabs %d)", d.used, p.live, p.slabBytes)
	}
}

// Outside packing, the pool's size classes are the driver's pages, so its
// live and cached bytes are what the device holds; trimming gives the
// cache back.
func TestPoolAccountIsTheDrivers(t *testing.T) {
	p, d := newFakePool()
	for _, n := range []uintptr{100, 700 << 10, 5767168, 96 << 20, 3<<20 + 1} {
		b, err := p.alloc(n)
		if err != nil {
			t.Fatal(err)
		}
		if p.live+p.cached != int64(d.used) {
			t.Errorf("after %d bytes: pool %d live + %d cached, device %d", n, p.live, p.cached, d.used)
		}
		p.put(b)
	}
	if err := p.trim(); err != nil {
		t.Fatal(err)
	}
	if p.cached != 0 || d.used != 0 {
		t.Errorf("after trim: %d cached, device holds %d", p.cached, d.used)
	}
}

func TestSlabPieces(t *testing.T) {
	for _, s := range []uintptr{5767168, 7864320, 1536, 256, 20 << 20} {
		m := slabPieces(s, 8)
		n := uintptr(m) * s
		if waste := roundPage(n) - n; float64(waste) > 0.01*float64(n) || roundPage(n) > slabMax+driverPage {
			t.Errorf("slabPieces(%d) = %d: slab %d bytes wastes %d", s, m, roundPage(n), waste)
		}
	}
}

// With the scratch arena reserved, an op's scratch — a small request and
// then a large one, freed in reverse order — is carved from it without the
// driver (the failure this replaced: the small request borrowed a large
// cached block, and the large one then passed the memory limit); memory
// that outlives the op never comes from it; scratch past the arena falls
// back to the driver under the limit, and past the limit fails with a
// sentence naming the memory plan.
func TestScratchArenaUnderLimit(t *testing.T) {
	p, d := newFakePool()
	if err := p.reserveScratch(100 << 20); err != nil {
		t.Fatal(err)
	}
	p.limit = p.live + 8<<20
	allocs := d.allocs
	for range 3 {
		small, err := p.alloc(2 << 20)
		if err != nil {
			t.Fatal(err)
		}
		large, err := p.alloc(96 << 20)
		if err != nil {
			t.Fatalf("the op's second scratch request: %v", err)
		}
		if small.ptr == large.ptr || large.ptr < small.ptr+small.size {
			t.Fatalf("pieces overlap: %#x+%d and %#x", small.ptr, small.size, large.ptr)
		}
		p.put(large)
		p.put(small)
	}
	if d.allocs != allocs {
		t.Errorf("scratch inside the arena went to the driver %d times", d.allocs-allocs)
	}
	if p.arena.off != 0 || len(p.arena.stack) != 0 {
		t.Errorf("arena not empty after every piece was freed: off %d, %d pieces", p.arena.off, len(p.arena.stack))
	}
	// Freed out of order: space comes back once the later piece is freed.
	a, _ := p.alloc(1 << 20)
	b, _ := p.alloc(1 << 20)
	p.put(a)
	if p.arena.off == 0 {
		t.Error("freeing the lower piece released the higher one's space")
	}
	p.put(b)
	if p.arena.off != 0 {
		t.Errorf("arena offset %d after both pieces were freed", p.arena.off)
	}
	keep, err := p.allocKeep(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	if keep.arena {
		t.Error("a long-lived allocation came from the scratch arena")
	}
	p.put(keep)
	over, err := p.alloc(101 << 20) // past the arena: the driver, under the limit
	if err == nil || !strings.Contains(err.Error(), "memory plan") {
		t.Errorf("scratch past the arena and the limit: %v, want an error naming the memory plan", err)
		if over != nil {
			p.put(over)
		}
	}
	p.limit = 0
	if err := p.close(); err != nil {
		t.Fatal(err)
	}
	if d.used != 0 {
		t.Errorf("after close the device holds %d bytes", d.used)
	}
}

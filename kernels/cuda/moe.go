package cuda

import (
	"encoding/binary"
	"fmt"
	"unsafe"

	"github.com/glmtopo/glmtopo/kernels"
)

// expertKey identifies a layer's expert list (the slice's backing array).
type expertKey struct {
	first *kernels.Expert
	ptr   uintptr
	n     int
}

// expertTable is a device array of ExpertPtrs (gate/up/down weights and
// scales per expert; zeros for experts not on this GPU) plus the shapes.
type expertTable struct {
	dev      *buf
	inter, h int
	suffix   string
	mode     int32
	sb0, sb1 int32
	vecGU    int32 // 8-wide path for gate/up (K = hidden)
	vecD     int32 // 8-wide path for down (K = intermediate)
	present  int   // experts on this GPU
	first    int   // index of the first expert on this GPU
	// Per expert (nil when absent): the weights, for the wide path's GEMMs.
	gate, up, down []weightInfo
}

func (b *Backend) expertTableFor(experts []*kernels.Expert, hidden int) (*expertTable, error) {
	if len(experts) == 0 {
		return nil, fmt.Errorf("cuda: moe: empty expert list")
	}
	key := expertKey{first: experts[0], ptr: uintptr(unsafe.Pointer(&experts[0])), n: len(experts)}
	if t, ok := b.experts[key]; ok {
		return t, nil
	}
	host := make([]byte, 48*len(experts))
	t := &expertTable{}
	set := false
	for e, ex := range experts {
		if ex == nil {
			continue
		}
		var ws [3]weightInfo
		for i, w := range []*kernels.Tensor{ex.Gate, ex.Up, ex.Down} {
			wi, err := weightOf(w, fmt.Sprintf("expert %d %s", e, [3]string{"gate", "up", "down"}[i]))
			if err != nil {
				return nil, err
			}
			ws[i] = wi
		}
		g, u, d := ws[0], ws[1], ws[2]
		if g.k != hidden || u.n != g.n || u.k != hidden || d.n != hidden || d.k != g.n {
			return nil, fmt.Errorf("cuda: moe expert %d shapes: gate [%d,%d] up [%d,%d] down [%d,%d] hidden %d",
				e, g.n, g.k, u.n, u.k, d.n, d.k, hidden)
		}
		if !set {
			t.first = e
			t.inter, t.h, t.suffix, t.mode, t.sb0, t.sb1 = g.n, hidden, g.suffix, g.mode, g.sb0, g.sb1
			t.vecGU, t.vecD = g.vec, d.vec
			set = true
		}
		for _, w := range ws {
			if w.suffix != t.suffix || w.mode != t.mode || w.sb0 != t.sb0 || w.sb1 != t.sb1 {
				return nil, fmt.Errorf("cuda: moe expert %d is stored as %s/%d, expert list as %s/%d (one format per layer)", e, w.suffix, w.mode, t.suffix, t.mode)
			}
		}
		if t.gate == nil {
			t.gate, t.up, t.down = make([]weightInfo, len(experts)), make([]weightInfo, len(experts)), make([]weightInfo, len(experts))
		}
		t.gate[e], t.up[e], t.down[e] = g, u, d
		t.present++
		for i, w := range ws {
			binary.LittleEndian.PutUint64(host[48*e+8*i:], uint64(w.ptr))
			binary.LittleEndian.PutUint64(host[48*e+24+8*i:], uint64(w.scale))
		}
	}
	if !set {
		t.h = hidden
	}
	bf, err := b.pool.alloc(uintptr(len(host)))
	if err != nil {
		return nil, err
	}
	t.dev = bf
	if err := b.d.check(b.d.cuMemcpyHtoDAsync(bf.ptr, unsafe.Pointer(&host[0]), uintptr(len(host)), b.stream), "upload expert table"); err != nil {
		return nil, err
	}
	b.experts[key] = t
	return t, nil
}

// MoE: plan (sort assignments by expert) → fused gate/up + SwiGLU per
// active expert → down per active expert → weighted combine in top-k order.
func (b *Backend) MoE(out, x, ids, weights *kernels.Tensor, experts []*kernels.Expert) error {
	op, err := ptrOf(out, kernels.F32, "moe output")
	if err != nil {
		return err
	}
	xp, err := ptrOf(x, kernels.F32, "moe input")
	if err != nil {
		return err
	}
	ip, err := ptrOf(ids, kernels.I32, "expert ids")
	if err != nil {
		return err
	}
	wp, err := ptrOf(weights, kernels.F32, "expert weights")
	if err != nil {
		return err
	}
	h, T := x.Cols(), x.Rows()
	if out.Cols() != h || out.Rows() != T || T == 0 || ids.Elements()%T != 0 || weights.Elements() != ids.Elements() {
		return fmt.Errorf("cuda: moe shapes: x %v out %v ids %d", x.Shape, out.Shape, ids.Elements())
	}
	k := ids.Elements() / T
	A := T * k
	E := len(experts)
	if E > 8192 {
		return fmt.Errorf("cuda: moe: %d experts", E)
	}
	return b.op(func() error {
		tab, err := b.expertTableFor(experts, h)
		if err != nil {
			return err
		}
		if tab.inter == 0 { // no expert of this list is on this GPU
			n := int64(T * h)
			return b.launch("ops", "fill_f32", grid1(n, 1024), b256, 0, op, n, float32(0))
		}
		I := tab.inter
		// Scratch: offsets[E+2], active[E], slot_of[A], perm[A], then h [A,I] and y [A,H].
		if A >= 16*tab.present && T > b.opt.GemvMaxTokens && b.blas != nil && !b.capturing {
			return b.moeWide(op, xp, ip, wp, tab, T, k, E, h)
		}
		ints := (E + 2) + E + 2*A
		intBytes := uintptr((4*ints + 255) &^ 255)
		scratch, err := b.pool.alloc(intBytes + uintptr(4*A*I) + uintptr(4*A*h))
		if err != nil {
			return err
		}
		defer b.pool.put(scratch)
		offsets := scratch.ptr
		active := offsets + uintptr(4*(E+2))
		slotOf := active + uintptr(4*E)
		perm := slotOf + uintptr(4*A)
		hbuf := scratch.ptr + intBytes
		ybuf := hbuf + uintptr(4*A*I)
		if err := b.launch("ops", "moe_plan", rows(1), b1024, uint32(4*(E+1)), ip, int32(A), tab.dev.ptr, int32(E),
			offsets, active, slotOf, perm, uintptr(0), b.errFlag.ptr); err != nil {
			return err
		}
		if b.sgOK(tab.gate[tab.first]) && b.sgOK(tab.down[tab.first]) {
			return b.sgMoE(op, xp, wp, tab, T, k, E, h, moePlanBufs{offsets: offsets, active: active, slotOf: slotOf, perm: perm, h: hbuf, y: ybuf})
		}
		maxActive := uint32(min(E, A))
		// An expert gets at most T tokens (top-k ids are distinct). A chunk
		// narrower than an expert's tokens re-reads its weights from DRAM
		// (the blocks' footprint exceeds L2), so size chunks for the worst
		// case, not the average: 8 covers all but a few experts at batch 64.
		tb := tokensPerPass(T)
		if b.mmaOK(tab.gate[tab.first]) && b.mmaOK(tab.down[tab.first]) {
			// 16 tokens per pass covers every expert at batch 64 but a rare few.
			ntt := min(2, (T+7)/8)
			gu, dn := fmt.Sprintf("moe_gate_up_mma_%s_n%d", tab.suffix, ntt), fmt.Sprintf("moe_down_mma_%s_n%d", tab.suffix, ntt)
			guGrid, err := b.residentBlocks("ops", gu)
			if err != nil {
				return err
			}
			dnGrid, err := b.residentBlocks("ops", dn)
			if err != nil {
				return err
			}
			guGrid = min(guGrid, int(maxActive)*((I+15)/16))
			dnGrid = min(dnGrid, int(maxActive)*((h+15)/16))
			// Activations as bf16 hi/lo planes: x [T,H] and then h [A,I].
			f16 := tab.suffix == "fp8"
			nx, nh := int64(T*h), int64(A*I)
			xpl, err := b.pool.alloc(uintptr(4*nx) + 256)
			if err != nil {
				return err
			}
			defer b.pool.put(xpl)
			hpl, err := b.pool.alloc(uintptr(4*nh) + 256)
			if err != nil {
				return err
			}
			defer b.pool.put(hpl)
			xsc, err := b.splitPlanes(xpl.ptr, xp, nx, f16)
			if err != nil {
				return err
			}
			if err := b.launch("ops", gu, rows(guGrid), b256, 0,
				hbuf, xpl.ptr, nx, xsc, tab.dev.ptr, int32(E), offsets, active, perm, int32(k), int32(I), int32(h), tab.mode, tab.sb0, tab.sb1); err != nil {
				return err
			}
			hsc, err := b.splitPlanes(hpl.ptr, hbuf, nh, f16)
			if err != nil {
				return err
			}
			if err := b.launch("ops", dn, rows(dnGrid), b256, 0,
				ybuf, hpl.ptr, nh, hsc, tab.dev.ptr, int32(E), offsets, active, int32(I), int32(h), tab.mode, tab.sb0, tab.sb1); err != nil {
				return err
			}
			return b.launch("ops", "moe_combine", rows(T), b256, 0, op, ybuf, wp, slotOf, int32(k), int32(h))
		}
		const warps = 8
		if err := b.launch("ops", fmt.Sprintf("moe_gate_up_%s_t%d", tab.suffix, tb), [3]uint32{uint32((I + 2*warps - 1) / (2 * warps)), maxActive, 1}, b256, 0,
			hbuf, xp, tab.dev.ptr, int32(E), offsets, active, perm, int32(k), int32(I), int32(h), tab.mode, tab.sb0, tab.sb1, tab.vecGU); err != nil {
			return err
		}
		if err := b.launch("ops", fmt.Sprintf("moe_down_%s_t%d", tab.suffix, tb), [3]uint32{uint32((h + 4*warps - 1) / (4 * warps)), maxActive, 1}, b256, 0,
			ybuf, hbuf, tab.dev.ptr, int32(E), offsets, active, int32(I), int32(h), tab.mode, tab.sb0, tab.sb1, tab.vecD); err != nil {
			return err
		}
		return b.launch("ops", "moe_combine", rows(T), b256, 0, op, ybuf, wp, slotOf, int32(k), int32(h))
	})
}

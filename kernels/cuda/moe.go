package cuda

import (
	"encoding/binary"
	"fmt"
	"unsafe"

	"github.com/glmtopo/glmtopo/kernels"
)

// expertKey identifies a layer's expert list (the slice's backing array).
type expertKey struct {
	first  *kernels.Expert
	ptr    uintptr
	n      int
	shared *kernels.Tensor // the shared expert's gate weight, when it is appended
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

// expertTableFor makes (once per expert list) the device table of a
// layer's experts; a non-nil shared expert is appended as entry len(experts).
func (b *Backend) expertTableFor(experts []*kernels.Expert, shared *kernels.Expert, hidden int) (*expertTable, error) {
	if len(experts) == 0 {
		return nil, fmt.Errorf("cuda: moe: empty expert list")
	}
	key := expertKey{first: experts[0], ptr: uintptr(unsafe.Pointer(&experts[0])), n: len(experts)}
	if shared != nil {
		key.shared = shared.Gate
		experts = append(experts[:len(experts):len(experts)], shared)
	}
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
	bf, err := b.pool.allocKeep(uintptr(len(host)))
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
	_, err := b.moe(out, x, ids, weights, experts, nil)
	return err
}

// MoEWithShared (kernels.SharedExpertMoE): on the streamed decode path the
// shared expert joins the routed ones as one more expert that every token
// takes with weight 1 (no separate split, GEMVs, SwiGLU and add: seven
// launches fewer per layer); elsewhere it reports false and does nothing.
func (b *Backend) MoEWithShared(out, x, ids, weights *kernels.Tensor, experts []*kernels.Expert, shared *kernels.Expert) (bool, error) {
	if shared == nil || shared.Gate == nil || shared.Up == nil || shared.Down == nil {
		return false, nil
	}
	return b.moe(out, x, ids, weights, experts, shared)
}

func (b *Backend) moe(out, x, ids, weights *kernels.Tensor, experts []*kernels.Expert, shared *kernels.Expert) (bool, error) {
	var ta tensorArgs
	op := ta.ptr(out, kernels.F32, "moe output")
	xp := ta.ptr(x, kernels.F32, "moe input")
	ip := ta.ptr(ids, kernels.I32, "expert ids")
	wp := ta.ptr(weights, kernels.F32, "expert weights")
	if ta.err != nil {
		return false, ta.err
	}
	h, T := x.Cols(), x.Rows()
	if out.Cols() != h || out.Rows() != T || T == 0 || ids.Elements()%T != 0 || weights.Elements() != ids.Elements() {
		return false, fmt.Errorf("cuda: moe shapes: x %v out %v ids %d", x.Shape, out.Shape, ids.Elements())
	}
	k := ids.Elements() / T
	if len(experts)+1 > 8192 {
		return false, fmt.Errorf("cuda: moe: %d experts", len(experts))
	}
	handled := true
	err := b.op(func() error {
		tab, err := b.expertTableFor(experts, nil, h)
		if err != nil {
			return err
		}
		if shared != nil {
			// Fused only where the streamed kernels run (and the shared expert
			// has the routed experts' shape and format); else the caller runs it.
			if ok, err := b.sharedFits(tab, shared, T, k); !ok || err != nil {
				handled = false
				return err
			}
			if tab, err = b.expertTableFor(experts, shared, h); err != nil {
				return err
			}
		}
		E, kv := len(experts), k
		if shared != nil {
			E, kv = E+1, k+1
		}
		A := T * kv
		if tab.inter == 0 { // no expert of this list is on this GPU
			n := int64(T * h)
			return b.launch("ops", "fill_f32", grid1(n, 1024), b256, 0, op, n, float32(0))
		}
		I := tab.inter
		// Scratch: offsets[E+2], active[E], slot_of[A], perm[A], then h [A,I] and y [A,H].
		if shared == nil && b.moeWideTakes(tab, T, k) {
			return b.moeWide(op, xp, ip, wp, tab, T, k, E, h)
		}
		intBytes := moePlanBytes(E, A, 0)
		scratch, err := b.pool.alloc(intBytes + uintptr(4*A*I) + uintptr(4*A*h))
		if err != nil {
			return err
		}
		defer b.pool.put(scratch)
		plan := moePlanLayout(scratch.ptr, E, A)
		plan.h = scratch.ptr + intBytes
		plan.y = plan.h + uintptr(4*A*I)
		if err := b.moePlan(plan, ip, tab, A, E, k, kv, 0); err != nil {
			return err
		}
		offsets, active, slotOf, perm, hbuf, ybuf := plan.offsets, plan.active, plan.slotOf, plan.perm, plan.h, plan.y
		if b.sgOK(tab.gate[tab.first]) && b.sgOK(tab.down[tab.first]) {
			return b.sgMoE(op, xp, wp, tab, T, k, kv, E, h, plan)
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
				hbuf, xpl.ptr, nx, xsc, tab.dev.ptr, int32(E), offsets, active, perm, int32(kv), int32(I), int32(h), tab.mode, tab.sb0, tab.sb1); err != nil {
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
			return b.moeCombine(op, ybuf, wp, slotOf, T, k, kv, h)
		}
		const warps = 8
		if err := b.launch("ops", fmt.Sprintf("moe_gate_up_%s_t%d", tab.suffix, tb), [3]uint32{uint32((I + 2*warps - 1) / (2 * warps)), maxActive, 1}, b256, 0,
			hbuf, xp, tab.dev.ptr, int32(E), offsets, active, perm, int32(kv), int32(I), int32(h), tab.mode, tab.sb0, tab.sb1, tab.vecGU); err != nil {
			return err
		}
		if err := b.launch("ops", fmt.Sprintf("moe_down_%s_t%d", tab.suffix, tb), [3]uint32{uint32((h + 4*warps - 1) / (4 * warps)), maxActive, 1}, b256, 0,
			ybuf, hbuf, tab.dev.ptr, int32(E), offsets, active, int32(I), int32(h), tab.mode, tab.sb0, tab.sb1, tab.vecD); err != nil {
			return err
		}
		return b.moeCombine(op, ybuf, wp, slotOf, T, k, kv, h)
	})
	return handled, err
}

// sharedFits says whether shared can run as one more expert of tab's
// streamed kernels for T tokens × k routed experts.
func (b *Backend) sharedFits(tab *expertTable, shared *kernels.Expert, T, k int) (bool, error) {
	if tab.inter == 0 || b.moeWideTakes(tab, T, k) || !b.sgOK(tab.gate[tab.first]) || !b.sgOK(tab.down[tab.first]) {
		return false, nil
	}
	// Only up to 16 tokens: wider, the shared expert's units (every token,
	// in passes of 8) would be the launch's long tail (Air fp8 batch 64:
	// 46% → 44% of the floor, H200), where its own Linear layers take
	// 16 tokens per pass (e4m3) or one cuBLAS GEMM (bf16).
	if T > mmaMaxTokens {
		return false, nil
	}
	ref := [3]weightInfo{tab.gate[tab.first], tab.up[tab.first], tab.down[tab.first]}
	for i, w := range []*kernels.Tensor{shared.Gate, shared.Up, shared.Down} {
		wi, err := weightOf(w, "shared expert")
		if err != nil {
			return false, err
		}
		if wi.n != ref[i].n || wi.k != ref[i].k || wi.suffix != ref[i].suffix || wi.mode != ref[i].mode || wi.sb0 != ref[i].sb0 || wi.sb1 != ref[i].sb1 {
			return false, nil
		}
	}
	return true, nil
}

// moeWideTakes says whether MoE runs T tokens × k experts on the wide
// (cuBLAS, per-expert GEMM) path: experts average ≥ 16 tokens.
func (b *Backend) moeWideTakes(tab *expertTable, T, k int) bool {
	return T*k >= 16*tab.present && T > b.opt.GemvMaxTokens && b.blas != nil && !b.capturing && k <= combineMaxK
}

// moePlanBytes is the scratch of moe_plan's integer outputs for E experts
// and A slots — offsets[E+2], active[E], slot_of[A], perm[A] — and extra
// ints after them, rounded up to 256 bytes.
func moePlanBytes(E, A, extra int) uintptr { return align256(4 * ((E + 2) + E + 2*A + extra)) }

// moePlanLayout places moe_plan's outputs from base, as moePlanBytes counts them.
func moePlanLayout(base uintptr, E, A int) moePlanBufs {
	p := moePlanBufs{offsets: base}
	p.active = p.offsets + uintptr(4*(E+2))
	p.slotOf = p.active + uintptr(4*E)
	p.perm = p.slotOf + uintptr(4*A)
	return p
}

// moePlan groups the A routed slots at ip by expert into plan (src/moe.cu
// moe_plan); expertOf, when not 0, receives each slot's expert.
func (b *Backend) moePlan(plan moePlanBufs, ip uintptr, tab *expertTable, A, E, k, kv int, expertOf uintptr) error {
	return b.launch("ops", "moe_plan", rows(1), b1024, uint32(4*(E+1)), ip, int32(A), tab.dev.ptr, int32(E),
		plan.offsets, plan.active, plan.slotOf, plan.perm, expertOf, b.errFlag.ptr, int32(k), int32(kv))
}

// combineMaxK is the most experts per token moe_combine_wide takes
// (COMBINE_MAX_K in src/moe.cu).
const combineMaxK = 32

// moeCombine writes out[t] = Σ_j w[t,j]·y[slot_of[t,j]] (+ the shared
// expert's row when kv = k+1), a block per token and 256 columns.
func (b *Backend) moeCombine(op, y, wp, slotOf uintptr, T, k, kv, H int) error {
	return b.launch("ops", "moe_combine", [3]uint32{uint32(T), uint32((H + 255) / 256), 1}, b256, 0, op, y, wp, slotOf, int32(k), int32(kv), int32(H))
}

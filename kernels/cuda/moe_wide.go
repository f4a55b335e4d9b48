package cuda

import (
	"fmt"
	"unsafe"

	"github.com/glmtopo/glmtopo/kernels"
)

const padRows = 128

func padded(n int) int { return (n + padRows - 1) / padRows * padRows }

// moeWide runs the routed experts of a wide batch (prefill) on cuBLAS: the
// plan is read back (one synchronisation), token rows are gathered per
// expert as bf16 (hi+lo halves unless FastWideGemm), and each active expert
// runs three GEMMs; SwiGLU and the weighted combine are single kernels.
func (b *Backend) moeWide(op, xp, ip, wp uintptr, tab *expertTable, T, k, E, H int) error {
	A, I := T*k, tab.inter
	split := 1
	if b.opt.FastWideGemm {
		split = 0
	}
	rowsF := 1 + split // GEMM rows per slot
	ints := (E + 2) + E + 3*A
	intBytes := uintptr((4*ints + 255) &^ 255)
	// GEMM row counts are padded to a multiple of padRows so that cuBLAS sees
	// a handful of shapes per layer: its per-call heuristics otherwise made
	// issuing the expert GEMMs take longer than running them (host-bound,
	// measured on H200). The padding rows compute garbage that the next
	// expert's GEMM overwrites in stream order, or that lands in the slack.
	rowsCap := rowsF*A + padRows
	sz := []uintptr{intBytes, uintptr(2 * rowsCap * H), uintptr(4 * rowsCap * I), uintptr(4 * rowsCap * I),
		uintptr(2 * rowsCap * I), uintptr(4 * rowsCap * H), uintptr(2 * max(I*H, H*I))}
	var total uintptr
	off := make([]uintptr, len(sz))
	for i, s := range sz {
		off[i] = total
		total += (s + 255) &^ 255
	}
	scratch, err := b.pool.alloc(total)
	if err != nil {
		return err
	}
	defer b.pool.put(scratch)
	base := scratch.ptr
	offsets := base
	active := offsets + uintptr(4*(E+2))
	slotOf := active + uintptr(4*E)
	perm := slotOf + uintptr(4*A)
	expertOf := perm + uintptr(4*A)
	xg, cg, cu, hg, cy, wdq := base+off[1], base+off[2], base+off[3], base+off[4], base+off[5], base+off[6]
	if err := b.launch("ops", "moe_plan", rows(1), b1024, uint32(4*(E+1)), ip, int32(A), tab.dev.ptr, int32(E),
		offsets, active, slotOf, perm, expertOf, b.errFlag.ptr); err != nil {
		return err
	}
	host := make([]int32, E+2)
	if err := b.d.check(b.d.cuMemcpyDtoHAsync(unsafe.Pointer(&host[0]), offsets, uintptr(4*(E+2)), b.stream), "read moe plan"); err != nil {
		return err
	}
	if err := b.d.check(b.d.cuStreamSynchronize(b.stream), "read moe plan"); err != nil {
		return err
	}
	slots := int(host[E])
	if slots == 0 {
		n := int64(T * H)
		return b.launch("ops", "fill_f32", grid1(n, 1024), b256, 0, op, n, float32(0))
	}
	if err := b.launch("ops", "moe_gather_x", rows(slots), b256, 0, xg, xp, perm, expertOf, offsets, int32(k), int32(H), int32(split)); err != nil {
		return err
	}
	// weight returns a bf16 device pointer for w (an FP8 weight is expanded into wdq).
	weight := func(w weightInfo) (uintptr, error) {
		if w.dtype == kernels.BF16 {
			return w.ptr, nil
		}
		if w.dtype != kernels.F8E4M3 {
			return 0, fmt.Errorf("cuda: moe: %v expert weights", w.dtype)
		}
		sb0, sb1 := w.sb0, w.sb1
		if sb1 == 0 {
			sb0, sb1 = 1, 1
		}
		nw := int64(w.n * w.k)
		return wdq, b.launch("ops", "dequant_fp8", grid1(nw, 1024), b256, 0, wdq, w.ptr, w.scale, w.mode, sb0, sb1,
			int32(w.n), int32(w.k), int32(1))
	}
	gemm := func(out, in uintptr, w weightInfo, rowsN, row0, inK, outN int) error {
		p, err := weight(w)
		if err != nil {
			return err
		}
		return b.blas.gemmBF16(out+uintptr(4*row0*outN), in+uintptr(2*row0*inK), p, rowsN, w.n, w.k)
	}
	for e := 0; e < E; e++ {
		cnt := int(host[e+1] - host[e])
		if cnt == 0 || tab.gate == nil || tab.gate[e].ptr == 0 {
			continue
		}
		row0, n := rowsF*int(host[e]), padded(rowsF*cnt)
		if err := gemm(cg, xg, tab.gate[e], n, row0, H, I); err != nil {
			return err
		}
		if err := gemm(cu, xg, tab.up[e], n, row0, H, I); err != nil {
			return err
		}
	}
	if err := b.launch("ops", "moe_swiglu_wide", rows(slots), b256, 0, hg, cg, cu, expertOf, offsets, int32(I), int32(split)); err != nil {
		return err
	}
	for e := 0; e < E; e++ {
		cnt := int(host[e+1] - host[e])
		if cnt == 0 || tab.down == nil || tab.down[e].ptr == 0 {
			continue
		}
		if err := gemm(cy, hg, tab.down[e], padded(rowsF*cnt), rowsF*int(host[e]), I, H); err != nil {
			return err
		}
	}
	return b.launch("ops", "moe_combine_wide", rows(T), b256, 0, op, cy, wp, slotOf, expertOf, offsets, int32(k), int32(H), int32(split))
}

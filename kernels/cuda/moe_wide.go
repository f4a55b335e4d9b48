package cuda

import (
	"fmt"
	"runtime"
	"slices"
	"unsafe"

	"github.com/glmtopo/glmtopo/kernels"
)

const padRows = 128

func padded(n int) int { return (n + padRows - 1) / padRows * padRows }

// fp8ExpertsPerBatch bounds how many FP8 experts are expanded to bf16 at a
// time for the batched GEMMs (scratch: that many copies of gate, up or down).
const fp8ExpertsPerBatch = 16

// moeWide runs the routed experts of a wide batch (prefill) on cuBLAS: the
// plan is read back (one synchronisation), token rows are gathered per
// expert as bf16 (hi+lo halves unless FastWideGemm) into ranges padded to
// 128 rows, and the experts' GEMMs run as batched calls, one per padded row
// count (gate and up together), so that the many small GEMMs fill the GPU
// instead of running one after another. SwiGLU and the weighted combine are
// single kernels.
func (b *Backend) moeWide(op, xp, ip, wp uintptr, tab *expertTable, T, k, E, H int) error {
	A, I := T*k, tab.inter
	split := 1
	if b.opt.FastWideGemm {
		split = 0
	}
	rowsF := 1 + split // GEMM rows per slot
	// moe_plan's outputs, then expert_of[A] and rowbase[E].
	intBuf, err := b.pool.alloc(moePlanBytes(E, A, A+E))
	if err != nil {
		return err
	}
	defer b.pool.put(intBuf)
	mp := moePlanLayout(intBuf.ptr, E, A)
	offsets, slotOf, perm := mp.offsets, mp.slotOf, mp.perm
	expertOf := perm + uintptr(4*A)
	rowbase := expertOf + uintptr(4*A)
	if err := b.moePlan(mp, ip, tab, A, E, k, k, expertOf); err != nil {
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
	// Each active expert's rows get their own range padded to padRows: cuBLAS
	// then sees a handful of shapes per layer (its per-call heuristics
	// otherwise dominate, measured on H200), and the padding rows, which
	// compute garbage, overlap no other expert's rows, so the GEMMs of one
	// shape can run as one batched call.
	base := make([]int32, E)
	var experts []int // active experts with weights here
	total := 0
	for e := range E {
		cnt := int(host[e+1] - host[e])
		base[e] = int32(total)
		if cnt == 0 || tab.gate == nil || tab.gate[e].ptr == 0 {
			continue
		}
		experts = append(experts, e)
		total += padded(rowsF * cnt)
	}
	if err := b.d.check(b.d.cuMemcpyHtoDAsync(rowbase, unsafe.Pointer(&base[0]), uintptr(4*E), b.stream), "upload moe rows"); err != nil {
		return err
	}
	runtime.KeepAlive(base)
	if len(experts) == 0 {
		return fmt.Errorf("cuda: moe: %d routed slots but no expert weights", slots)
	}
	fp8 := tab.gate[experts[0]].dtype == kernels.F8E4M3
	// Per-channel scales are applied to the GEMM outputs (exact e4m3 in the
	// bf16 copies); block scales are folded into the copies.
	chscale := int32(0)
	if fp8 && tab.mode == 1 {
		chscale = 1
	}
	chunk := len(experts)
	// The scratch is sized for the worst routing (every expert here active,
	// each padding its rows), not this step's: the engine's start-up
	// profile runs dummy tokens, and a step must never need more scratch
	// than the profile measured for its token count.
	chunkCap, rowsCap := tab.present, max(total, rowsF*A+min(tab.present, A)*(padRows-1))
	if fp8 {
		chunk = min(chunk, max(1, b.fp8Chunk))
		chunkCap = min(chunkCap, max(1, b.fp8Chunk))
	}
	// Block-scaled FP8 weights (unless FastWideGemm) are expanded as two
	// bf16 halves, hi at wdq and lo at wdq+loOff, each GEMM then run once per
	// half: the scaled weights keep ~16 bits, as on the CPU.
	wdqBytes, loOff, halvesW := 0, 0, 1
	if fp8 {
		wdqBytes = 2 * chunkCap * max(2*I*H, H*I)
		if split == 1 && tab.mode == 2 {
			loOff, halvesW = wdqBytes/2, 2
			wdqBytes *= 2
		}
	}
	// Pointer arrays: per expert 2 (gate, up) + 1 (down) problems per weight
	// half, 3 pointers each.
	ptrBytes := 8 * 3 * 3 * halvesW * max(tab.present, len(experts))
	sz := []int{2 * rowsCap * H, 4 * rowsCap * I, 4 * rowsCap * I, 2 * rowsCap * I, 4 * rowsCap * H, wdqBytes, ptrBytes}
	var size uintptr
	off := make([]uintptr, len(sz))
	for i, s := range sz {
		off[i] = size
		size += (uintptr(s) + 255) &^ 255
	}
	scratch, err := b.pool.alloc(size)
	if err != nil {
		return err
	}
	defer b.pool.put(scratch)
	p0 := scratch.ptr
	xg, cg, cu, hg, cy, wdq, ptrs := p0+off[0], p0+off[1], p0+off[2], p0+off[3], p0+off[4], p0+off[5], p0+off[6]
	plan := wideGemmPlan{wdq: wdq, loOff: loOff, host: make([]uint64, 0, 9*halvesW*len(experts))}
	var gateUp, down []gemmChunk
	for c := 0; c < len(experts); c += chunk {
		ex := experts[c:min(c+chunk, len(experts))]
		gu, err := plan.add(ex, host, rowsF, func(e, j int) []problem {
			r := int(base[e])
			return []problem{
				{w: tab.gate[e], wdq: 2 * j * I * H, x: xg + uintptr(2*r*H), out: cg + uintptr(4*r*I)},
				{w: tab.up[e], wdq: (2*j + 1) * I * H, x: xg + uintptr(2*r*H), out: cu + uintptr(4*r*I)},
			}
		})
		if err != nil {
			return err
		}
		d, err := plan.add(ex, host, rowsF, func(e, j int) []problem {
			r := int(base[e])
			return []problem{{w: tab.down[e], wdq: j * H * I, x: hg + uintptr(2*r*I), out: cy + uintptr(4*r*H)}}
		})
		if err != nil {
			return err
		}
		gateUp, down = append(gateUp, gu), append(down, d)
	}
	// One upload for every pointer array (a copy from pageable memory waits for the stream).
	if err := b.d.check(b.d.cuMemcpyHtoDAsync(ptrs, unsafe.Pointer(&plan.host[0]), uintptr(8*len(plan.host)), b.stream), "upload gemm pointers"); err != nil {
		return err
	}
	runtime.KeepAlive(plan.host)
	if err := b.launch("ops", "moe_gather_x", rows(slots), b256, 0, xg, xp, perm, expertOf, offsets, rowbase,
		int32(k), int32(H), int32(split)); err != nil {
		return err
	}
	for _, c := range gateUp {
		if err := b.runGemmChunk(c, ptrs); err != nil {
			return err
		}
	}
	if err := b.launch("ops", "moe_swiglu_wide", rows(slots), b256, 0, hg, cg, cu, expertOf, offsets, rowbase,
		tab.dev.ptr, chscale, int32(I), int32(split)); err != nil {
		return err
	}
	for _, c := range down {
		if err := b.runGemmChunk(c, ptrs); err != nil {
			return err
		}
	}
	return b.launch("ops", "moe_combine_wide", rows(T), b256, 0, op, cy, wp, slotOf, expertOf, offsets, rowbase,
		tab.dev.ptr, chscale, int32(k), int32(H), int32(split))
}

// problem is one expert GEMM: out = x · wᵀ (an FP8 w expanded at wdq, in
// bf16 elements from the chunk's scratch).
type problem struct {
	w      weightInfo
	wdq    int
	x, out uintptr
	lo     bool // dequant: the rounding remainder of the scaled weights
}

// wideGemmPlan collects the batched expert GEMMs of one MoE call: their
// pointer arrays (out, x, w per batch, in call order) in host, uploaded once.
type wideGemmPlan struct {
	wdq   uintptr
	loOff int // bf16 elements from a hi copy to its lo copy; 0: no lo copies
	host  []uint64
}

// gemmChunk is the work of one chunk of experts: FP8 weights to expand
// (w into dst), then batched GEMMs.
type gemmChunk struct {
	dequant []problem // w: the FP8 weight; out: its bf16 copy
	batches []gemmBatch
}

// gemmBatch is one batched call: count problems of m×n×k whose pointer
// arrays start at element at of the plan's array; beta 1 accumulates.
type gemmBatch struct {
	m, n, k, count, at int
	beta               float32
}

// add plans the problems of experts ex (problems(e, j) for the j-th of
// them): one batch per padded row count.
func (p *wideGemmPlan) add(ex []int, counts []int32, rowsF int, problems func(e, j int) []problem) (gemmChunk, error) {
	var c gemmChunk
	byRows := map[int][]problem{}
	loRows := map[int][]problem{} // the same problems on the weights' lo halves
	for j, e := range ex {
		m := padded(rowsF * int(counts[e+1]-counts[e]))
		for _, pr := range problems(e, j) {
			switch pr.w.dtype {
			case kernels.BF16:
			case kernels.F8E4M3:
				dst := p.wdq + uintptr(2*pr.wdq)
				c.dequant = append(c.dequant, problem{w: pr.w, out: dst})
				if p.loOff > 0 && pr.w.mode == 2 {
					lo := pr
					lo.w.ptr = dst + uintptr(2*p.loOff)
					c.dequant = append(c.dequant, problem{w: pr.w, out: lo.w.ptr, lo: true})
					loRows[m] = append(loRows[m], lo)
				}
				pr.w.ptr = dst
			default:
				return c, fmt.Errorf("cuda: moe: %v expert weights", pr.w.dtype)
			}
			byRows[m] = append(byRows[m], pr)
		}
	}
	ms := make([]int, 0, len(byRows))
	for m := range byRows {
		ms = append(ms, m)
	}
	slices.Sort(ms)
	for _, m := range ms {
		for i, prs := range [][]problem{byRows[m], loRows[m]} {
			if len(prs) == 0 {
				continue
			}
			c.batches = append(c.batches, gemmBatch{m: m, n: prs[0].w.n, k: prs[0].w.k, count: len(prs), at: len(p.host), beta: float32(i)})
			for _, pr := range prs {
				p.host = append(p.host, uint64(pr.out))
			}
			for _, pr := range prs {
				p.host = append(p.host, uint64(pr.x))
			}
			for _, pr := range prs {
				p.host = append(p.host, uint64(pr.w.ptr))
			}
		}
	}
	return c, nil
}

// runGemmChunk expands c's FP8 weights and issues its batched GEMMs; ptrs
// holds the plan's pointer arrays on the device.
func (b *Backend) runGemmChunk(c gemmChunk, ptrs uintptr) error {
	for _, d := range c.dequant {
		// Per-channel scales stay out of the copy (moe_swiglu_wide and
		// moe_combine_wide apply them); block scales are always folded in.
		if err := b.dequantFP8(d.out, d.w, d.lo); err != nil {
			return err
		}
	}
	for _, g := range c.batches {
		dev := ptrs + uintptr(8*g.at)
		if err := b.blas.gemmBF16Batched(dev, dev+uintptr(8*g.count), dev+uintptr(16*g.count), g.m, g.n, g.k, g.count, g.beta); err != nil {
			return err
		}
	}
	return nil
}

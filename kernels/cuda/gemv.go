package cuda

import (
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"
)

// The streamed GEMV kernels (src/gemv.cu): narrow batches' Linear layers and
// routed experts, one block per unit of 16 weight rows × a K range.

const (
	sgThreads = 256 // 32 · SG_WPB
	// sgMaxCounters bounds the row groups of a launch that splits K (split
	// only happens when groups are fewer than the resident blocks).
	sgMaxCounters = 1 << 16
	// sgFP8MaxTokens is the widest batch whose e4m3 Linear layers stay on
	// the streamed kernel (in passes of 16 tokens, later passes from L2):
	// the cuBLAS path must first expand the weight to a bf16 copy (5 bytes
	// moved per weight instead of 1).
	sgFP8MaxTokens = 64
)

// sgChunk is the weights per row that one lane group of four reads per
// pipeline stage (16 bytes per lane).
func sgChunk(dt kernels.DType) int {
	if dt == kernels.F8E4M3 {
		return 64
	}
	return 32
}

// sgOK says whether the streamed GEMV takes w: bf16, or e4m3 with
// per-channel scales or block scales whose blocks hold whole 16-row groups
// and chunks; K a multiple of the chunk.
func (b *Backend) sgOK(wi weightInfo) bool {
	if b.opt.BlockGemv || b.opt.NoTensorCoreGemv {
		return false
	}
	if wi.dtype != kernels.BF16 && wi.dtype != kernels.F8E4M3 {
		return false
	}
	ck := sgChunk(wi.dtype)
	if wi.k%ck != 0 || (wi.n+15)/16 > sgMaxCounters {
		return false
	}
	return wi.mode != 2 || (int(wi.sb1)%ck == 0 && wi.sb0%16 == 0)
}

// sgMinChunks keeps each unit long enough to amortise its pipeline fill:
// two chunks per warp.
const sgMinChunks = 16

// sgWarpsPerUnit is how many of a block's 8 warps share one unit of
// chunks chunks: as many as keep ≥ 8 chunks each (a short K, like the
// experts' down projection, then runs several units per block at once
// instead of leaving each warp two chunks and a pipeline fill).
func sgWarpsPerUnit(chunks int) int {
	w := 8
	for w > 1 && chunks < 8*w {
		w /= 2
	}
	return w
}

// sgPlan picks the warps per unit and the K splits of units row groups of
// nch chunks on blocks resident blocks.
func sgPlan(units, blocks, nch int) (wpu, P int) {
	wpu = sgWarpsPerUnit(nch)
	P = sgSplits(units, blocks*(8/wpu), nch)
	return sgWarpsPerUnit(nch / P), P
}

// sgSplits is how many K ranges each of units row groups is cut into: the
// P with the least modelled time, waves of resident blocks × (chunks per
// warp + ~2 chunks of pipeline fill), so that few units (a batch-1 step
// touches 8 experts) still fill the GPU without cutting K into slivers.
func sgSplits(units, blocks, chunks int) int {
	if units <= 0 || units >= blocks || units > sgMaxCounters {
		return 1
	}
	const wpb = sgThreads / 32
	best, bestCost := 1, -1
	for p := 1; p <= max(1, chunks/sgMinChunks); p++ {
		waves := (units*p + blocks - 1) / blocks
		cost := waves * ((chunks+p*wpb-1)/(p*wpb) + 2)
		if bestCost < 0 || cost < bestCost {
			best, bestCost = p, cost
		}
	}
	return best
}

func align256(n int) uintptr { return uintptr((n + 255) &^ 255) }

// sgSplitRows writes x [rows, K] (f32) as the kernels' activation planes at
// planes (4·rows·K bytes): f16 planes scaled per row (scales at inv) for
// e4m3 weights, unscaled bf16 planes for bf16 weights (inv unused).
func (b *Backend) sgSplitRows(planes, inv, x uintptr, rows, K int, fp8 bool) error {
	if !fp8 {
		n := int64(rows * K)
		return b.launch("ops", "split_planes", grid1(n, 256), b256, 0, planes, x, n)
	}
	return b.launch("ops", "sg_split_f16", rows1(rows), b1024, 0, planes, inv, x, int32(rows), int32(K), b.fp8Planes()-1)
}

// fp8Planes is how many f16 activation planes the e4m3 GEMVs read: 1, or 2
// with Options.ExactFP8Activations.
func (b *Backend) fp8Planes() int32 {
	if b.opt.ExactFP8Activations {
		return 2
	}
	return 1
}

// planeOffset is the elements from the hi plane to the lo plane of rows×K
// activations, 0 when the kernels read no lo plane.
func (b *Backend) planeOffset(fp8 bool, rows, K int) int64 {
	if fp8 && b.fp8Planes() == 1 {
		return 0
	}
	return int64(rows * K)
}

func rows1(n int) [3]uint32 { return rows(max(1, n)) }

// sgLinearTakes says whether the streamed kernel runs w for T tokens.
func (b *Backend) sgLinearTakes(wi weightInfo, T int) bool {
	return b.sgOK(wi) && (T <= mmaMaxTokens || wi.dtype == kernels.F8E4M3 && T <= sgFP8MaxTokens)
}

// sgLinear runs out[T,N] = x·wᵀ (+bias) on the streamed kernel, or on the
// wide one (src/wgemv.cu) where wgTakes.
func (b *Backend) sgLinear(op, xp, bp uintptr, wi weightInfo, T int) error {
	if b.wgTakes(wi, T) {
		return b.wgLinear(op, xp, bp, wi, T)
	}
	return b.sgLinearSegs([]sgSeg{{out: op, bias: bp, w: wi}}, xp, T)
}

// wgTakes says whether the wide kernel runs an e4m3 Linear of T tokens
// (Options.WideGemvMinTokens to 64, one f16 activation plane).
func (b *Backend) wgTakes(wi weightInfo, T int) bool {
	return wi.dtype == kernels.F8E4M3 && T >= b.opt.WideGemvMinTokens && T <= wgMaxTokens && b.fp8Planes() == 1 &&
		!b.opt.NoWideGemv && b.sgOK(wi)
}

// wgMaxTokens is WG_T of src/wgemv.cu, wgRows WG_R, wgSmem WG_SMEM_BYTES.
const (
	wgMaxTokens = 64
	wgRows      = 64
	wgStages    = 3
	wgSmem      = wgStages*wgMaxTokens*(256+8)*2 + 8*wgStages*4*32*16
)

// wgLinear runs an e4m3 Linear of up to 64 tokens on wg_linear_fp8: blocks of
// 64 rows × a K range in slices of 256, K split to fill the GPU in whole waves.
func (b *Backend) wgLinear(op, xp, bp uintptr, wi weightInfo, T int) error {
	const kernel = "wg_linear_fp8"
	f, err := b.fn("ops", kernel)
	if err != nil {
		return err
	}
	blocks, ok := b.resident["ops/"+kernel]
	if !ok {
		if err := b.d.check(b.d.cuFuncSetAttribute(f, funcAttrMaxDynamicShared, int32(wgSmem)), "wide gemv shared memory"); err != nil {
			return err
		}
		var per int32
		if err := b.d.check(b.d.cuOccupancyMaxActiveBlocksPerMultiprocessor(&per, f, sgThreads, wgSmem), "occupancy "+kernel); err != nil {
			return err
		}
		blocks = max(1, int(per)) * b.sms
		b.resident["ops/"+kernel] = blocks
	}
	rowBlocks, nch := (wi.n+wgRows-1)/wgRows, wi.k/64
	P := wgSplits(rowBlocks, blocks, nch)
	scratch, planes, inv, part, err := b.splitScratch(xp, T, wi.k, 2*T*wi.k, P, wi.n, true)
	if err != nil {
		return err
	}
	defer b.pool.put(scratch)
	return b.launch("ops", kernel, rows(rowBlocks*P), b256, wgSmem, op, planes, inv, wi.ptr, wi.scale, wi.mode, wi.sb0, wi.sb1, bp,
		int32(T), int32(wi.n), int32(wi.k), int32(P), part, b.sgCounters.ptr)
}

// splitScratch allocates a GEMV's scratch — planeBytes of activation planes,
// T row scales and, when K is split (P > 1), P partial sums of T×n floats —
// and writes x [T,K]'s planes into it. The caller puts the buffer back.
func (b *Backend) splitScratch(xp uintptr, T, K, planeBytes, P, n int, fp8 bool) (s *buf, planes, inv, part uintptr, err error) {
	planeB, invB := align256(planeBytes), align256(4*T)
	partB := uintptr(0)
	if P > 1 {
		partB = align256(4 * P * T * n)
	}
	if s, err = b.pool.alloc(planeB + invB + partB); err != nil {
		return nil, 0, 0, 0, err
	}
	planes, inv, part = s.ptr, s.ptr+planeB, s.ptr+planeB+invB
	if err = b.sgSplitRows(planes, inv, xp, T, K, fp8); err != nil {
		b.pool.put(s)
		return nil, 0, 0, 0, err
	}
	return s, planes, inv, part, nil
}

// sgSeg is one Linear of a streamed launch: output, bias, weight.
type sgSeg struct {
	out, bias uintptr
	w         weightInfo
}

// sgLinearSegs runs one to three Linear layers of the same input x [T,K]
// (same weight format) in one launch after one activation split: the q, k
// and v projections at batch 1 were three splits and three launches, k and
// v each ~10 µs for 4 MB of e4m3 (H200, ncu): latency, not bandwidth.
func (b *Backend) sgLinearSegs(segs []sgSeg, xp uintptr, T int) error {
	wi := segs[0].w
	fp8 := wi.dtype == kernels.F8E4M3
	ntt := min(2, (T+7)/8)
	kernel := fmt.Sprintf("sg_linear_%s_n%d", wi.suffix, ntt)
	if len(segs) > 1 {
		kernel = fmt.Sprintf("sg_linear3_%s_n%d", wi.suffix, ntt)
	}
	blocks, err := b.residentBlocksOf("ops", kernel, sgThreads)
	if err != nil {
		return err
	}
	groups, ntot := 0, 0
	for _, s := range segs {
		groups += (s.w.n + 15) / 16
		ntot += s.w.n
	}
	wpu, P := sgPlan(groups, blocks, wi.k/sgChunk(wi.dtype))
	scratch, planes, inv, part, err := b.splitScratch(xp, T, wi.k, 4*T*wi.k, P, ntot, fp8)
	if err != nil {
		return err
	}
	defer b.pool.put(scratch)
	xinv := uintptr(0)
	if fp8 {
		xinv = inv
	}
	grid := rows(min(blocks, (groups*P*wpu+7)/8))
	if len(segs) == 1 {
		return b.launch("ops", kernel, grid, b256, 0, segs[0].out, planes, b.planeOffset(fp8, T, wi.k), xinv, wi.ptr,
			wi.scale, wi.mode, wi.sb0, wi.sb1, segs[0].bias, int32(T), int32(wi.n), int32(wi.k), int32(P), part, b.sgCounters.ptr, int32(wpu))
	}
	args := []any{planes, b.planeOffset(fp8, T, wi.k), xinv, wi.mode, wi.sb0, wi.sb1, int32(T), int32(wi.k), int32(P), part,
		b.sgCounters.ptr, int32(wpu), int32(len(segs))}
	for i := range 3 {
		var s sgSeg
		if i < len(segs) {
			s = segs[i]
		}
		args = append(args, s.out, s.w.ptr, s.w.scale, s.bias, int32(s.w.n))
	}
	return b.launch("ops", kernel, grid, b256, 0, args...)
}

// LinearMulti (kernels.MultiLinear) runs Linear layers of one input in one
// streamed launch when they fit it (2–3 of them, same format and K, up to
// 16 tokens: wider e4m3 batches keep separate launches, the three-segment
// kernel's two-tile variant spilling registers); else it reports false
// having done nothing.
func (b *Backend) LinearMulti(outs []*kernels.Tensor, x *kernels.Tensor, ws, biases []*kernels.Tensor) (bool, error) {
	if len(outs) < 2 || len(outs) > 3 || len(ws) != len(outs) || len(biases) != len(outs) || x.Rows() > mmaMaxTokens {
		return false, nil
	}
	xp, err := ptrOf(x, kernels.F32, "linear input")
	if err != nil {
		return false, err
	}
	T, K := x.Rows(), x.Cols()
	segs := make([]sgSeg, len(outs))
	groups := 0
	for i := range outs {
		wi, err := weightOf(ws[i], "linear weight")
		if err != nil {
			return false, err
		}
		var ta tensorArgs
		op := ta.ptr(outs[i], kernels.F32, "linear output")
		bp := ta.opt(biases[i], "linear bias")
		if ta.err != nil {
			return false, ta.err
		}
		if K != wi.k || outs[i].Cols() != wi.n || outs[i].Rows() != T {
			return false, fmt.Errorf("cuda: linear shapes: x %v, w [%d,%d], out %v", x.Shape, wi.n, wi.k, outs[i].Shape)
		}
		if biases[i] != nil && biases[i].Elements() != wi.n {
			return false, fmt.Errorf("cuda: linear bias has %d entries for %d outputs", biases[i].Elements(), wi.n)
		}
		w0 := segs[0].w
		if i > 0 && (wi.dtype != w0.dtype || wi.mode != w0.mode || wi.sb0 != w0.sb0 || wi.sb1 != w0.sb1) {
			return false, nil
		}
		if !b.sgLinearTakes(wi, T) || b.wgTakes(wi, T) {
			return false, nil
		}
		segs[i] = sgSeg{out: op, bias: bp, w: wi}
		groups += (wi.n + 15) / 16
	}
	if groups > sgMaxCounters {
		return false, nil
	}
	return true, b.op(func() error { return b.sgLinearSegs(segs, xp, T) })
}

// wgSplits picks the K splits of rowBlocks row blocks of nch 64-wide
// chunks on blocks resident blocks: the least waves × (slices per split +
// ~2 slices of pipeline fill), at least 2 slices per split.
func wgSplits(rowBlocks, blocks, nch int) int {
	best, bestCost := 1, -1
	for p := 1; p == 1 || nch/p >= 8; p++ {
		waves := (rowBlocks*p + blocks - 1) / blocks
		cost := waves * ((nch+4*p-1)/(4*p) + 2)
		if bestCost < 0 || cost < bestCost {
			best, bestCost = p, cost
		}
	}
	return best
}

// sgMoE runs the routed experts of a narrow batch on the streamed kernels,
// after moe_plan: x → planes; gate/up + SwiGLU → h [A,I]; h → planes;
// down → y [A,H]; weighted combine into out.
func (b *Backend) sgMoE(op, xp, wp uintptr, tab *expertTable, T, k, kv, E, H int, plan moePlanBufs) error {
	A, I := T*kv, tab.inter
	g, d := tab.gate[tab.first], tab.down[tab.first]
	fp8 := g.dtype == kernels.F8E4M3
	// One token tile unless experts average more than 4 tokens: the rare
	// expert with more takes another pass over its rows (from L2), and the
	// one-tile kernels keep fewer registers.
	ntt := 1
	if T*k > 4*E { // routed slots only: a shared expert would tip every expert into two tiles
		ntt = 2
	}
	gu, dn := fmt.Sprintf("sg_gate_up_%s_n%d", tab.suffix, ntt), fmt.Sprintf("sg_down_%s_n%d", tab.suffix, ntt)
	guBlocks, err := b.residentBlocksOf("ops", gu, sgThreads)
	if err != nil {
		return err
	}
	dnBlocks, err := b.residentBlocksOf("ops", dn, sgThreads)
	if err != nil {
		return err
	}
	maxActive := min(E, A, tab.present)
	guUnits, dnUnits := maxActive*((I+15)/16), maxActive*((H+15)/16)
	wGU, pGU := sgPlan(guUnits, guBlocks, g.k/sgChunk(g.dtype))
	wDn, pDn := sgPlan(dnUnits, dnBlocks, d.k/sgChunk(d.dtype))
	xplB, xinvB, hplB, hinvB := align256(4*T*H), align256(4*T), align256(4*A*I), align256(4*A)
	partB := uintptr(0)
	if pGU > 1 || pDn > 1 {
		partB = align256(4 * max(pGU*A*2*I, pDn*A*H))
	}
	scratch, err := b.pool.alloc(xplB + xinvB + hplB + hinvB + partB)
	if err != nil {
		return err
	}
	defer b.pool.put(scratch)
	xpl := scratch.ptr
	xinv := xpl + xplB
	hpl := xinv + xinvB
	hinv := hpl + hplB
	part := hinv + hinvB
	if err := b.sgSplitRows(xpl, xinv, xp, T, H, fp8); err != nil {
		return err
	}
	xs, hs := uintptr(0), uintptr(0)
	if fp8 {
		xs, hs = xinv, hinv
	}
	if err := b.launch("ops", gu, rows(min(guBlocks, (guUnits*pGU*wGU+7)/8)), b256, 0,
		plan.h, xpl, b.planeOffset(fp8, T, H), xs, tab.dev.ptr, int32(E), plan.offsets, plan.active, plan.perm, int32(kv), int32(I), int32(H),
		tab.mode, tab.sb0, tab.sb1, int32(pGU), part, b.sgCounters.ptr, int32(wGU)); err != nil {
		return err
	}
	if err := b.sgSplitRows(hpl, hinv, plan.h, A, I, fp8); err != nil {
		return err
	}
	if err := b.launch("ops", dn, rows(min(dnBlocks, (dnUnits*pDn*wDn+7)/8)), b256, 0,
		plan.y, hpl, b.planeOffset(fp8, A, I), hs, tab.dev.ptr, int32(E), plan.offsets, plan.active, int32(I), int32(H),
		tab.mode, tab.sb0, tab.sb1, int32(pDn), part, b.sgCounters.ptr, int32(wDn)); err != nil {
		return err
	}
	return b.moeCombine(op, plan.y, wp, plan.slotOf, T, k, kv, H)
}

// moePlanBufs are moe_plan's outputs and the expert outputs' scratch.
type moePlanBufs struct {
	offsets, active, slotOf, perm uintptr
	h, y                          uintptr // [A,I] and [A,H] f32
}

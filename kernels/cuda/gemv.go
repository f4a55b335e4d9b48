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

// sgLinear runs out[T,N] = x·wᵀ (+bias) on the streamed kernel.
func (b *Backend) sgLinear(op, xp, bp uintptr, wi weightInfo, T int) error {
	fp8 := wi.dtype == kernels.F8E4M3
	ntt := min(2, (T+7)/8)
	kernel := fmt.Sprintf("sg_linear_%s_n%d", wi.suffix, ntt)
	blocks, err := b.residentBlocksOf("ops", kernel, sgThreads)
	if err != nil {
		return err
	}
	groups := (wi.n + 15) / 16
	wpu, P := sgPlan(groups, blocks, wi.k/sgChunk(wi.dtype))
	planeB, invB := align256(4*T*wi.k), align256(4*T)
	partB := uintptr(0)
	if P > 1 {
		partB = align256(4 * P * T * wi.n)
	}
	scratch, err := b.pool.alloc(planeB + invB + partB)
	if err != nil {
		return err
	}
	defer b.pool.put(scratch)
	planes, inv, part := scratch.ptr, scratch.ptr+planeB, scratch.ptr+planeB+invB
	if err := b.sgSplitRows(planes, inv, xp, T, wi.k, fp8); err != nil {
		return err
	}
	xinv := uintptr(0)
	if fp8 {
		xinv = inv
	}
	grid := min(blocks, (groups*P*wpu+7)/8)
	return b.launch("ops", kernel, rows(grid), b256, 0, op, planes, b.planeOffset(fp8, T, wi.k), xinv, wi.ptr,
		wi.scale, wi.mode, wi.sb0, wi.sb1, bp, int32(T), int32(wi.n), int32(wi.k), int32(P), part, b.sgCounters.ptr, int32(wpu))
}

// sgMoE runs the routed experts of a narrow batch on the streamed kernels,
// after moe_plan: x → planes; gate/up + SwiGLU → h [A,I]; h → planes;
// down → y [A,H]; weighted combine into out.
func (b *Backend) sgMoE(op, xp, wp uintptr, tab *expertTable, T, k, E, H int, plan moePlanBufs) error {
	A, I := T*k, tab.inter
	g, d := tab.gate[tab.first], tab.down[tab.first]
	fp8 := g.dtype == kernels.F8E4M3
	// One token tile unless experts average more than 4 tokens: the rare
	// expert with more takes another pass over its rows (from L2), and the
	// one-tile kernels keep fewer registers.
	ntt := 1
	if A > 4*E {
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
		plan.h, xpl, b.planeOffset(fp8, T, H), xs, tab.dev.ptr, int32(E), plan.offsets, plan.active, plan.perm, int32(k), int32(I), int32(H),
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
	return b.launch("ops", "moe_combine", rows(T), b256, 0, op, plan.y, wp, plan.slotOf, int32(k), int32(H))
}

// moePlanBufs are moe_plan's outputs and the expert outputs' scratch.
type moePlanBufs struct {
	offsets, active, slotOf, perm uintptr
	h, y                          uintptr // [A,I] and [A,H] f32
}

package cuda

import (
	"encoding/binary"
	"fmt"
	"math"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
)

func TestElementwiseTwins(t *testing.T) {
	p := newPair(t)
	for _, sh := range [][2]int{{1, 7}, {5, 131}, {3, 4097}} {
		T, H := sh[0], sh[1]
		t.Run(fmt.Sprintf("%dx%d", T, H), func(t *testing.T) {
			p := p.sub(t)
			x, y, w := p.f32(2, T, H), p.f32(2, T, H), p.f32(1, H)
			out := p.poisoned(T, H)
			must(t, "rmsnorm", p.cpu.RMSNorm(out.c, x.c, w.c, 1e-5), p.gpu.RMSNorm(out.g, x.g, w.g, 1e-5))
			p.check("rmsnorm", out, 1e-5)
			resid := p.f32(3, T, H)
			must(t, "add-rmsnorm", p.cpu.AddRMSNorm(resid.c, x.c, out.c, w.c, 1e-5), p.gpu.AddRMSNorm(resid.g, x.g, out.g, w.g, 1e-5))
			p.check("add-rmsnorm out", out, 1e-5)
			p.check("add-rmsnorm residual", resid, 1e-6)
			must(t, "silu", p.cpu.SiluMul(out.c, x.c, y.c), p.gpu.SiluMul(out.g, x.g, y.g))
			p.check("silu-mul", out, 1e-5)
			must(t, "add", p.cpu.Add(out.c, x.c, y.c), p.gpu.Add(out.g, x.g, y.g))
			p.check("add", out, 1e-6)
			cat := p.poisoned(T, 2*H+3)
			z := p.f32(1, T, H+3)
			must(t, "concat", p.cpu.Concat(cat.c, x.c, z.c), p.gpu.Concat(cat.g, x.g, z.g))
			p.check("concat", cat, 0)
		})
	}
}

func TestEmbedTwin(t *testing.T) {
	p := newPair(t)
	for _, dt := range []kernels.DType{kernels.F32, kernels.BF16} {
		V, H := 37, 70
		table := p.weight(dt, 0, [2]int{}, V, H)
		ids := p.i32([]int32{3, -1, 36, 0, 17}, 5)
		out := p.poisoned(5, H)
		must(t, "embed", p.cpu.Embed(out.c, table.c, ids.c), p.gpu.Embed(out.g, table.g, ids.g))
		p.check("embed "+dt.String(), out, 0)
	}
	// An id outside the vocabulary is an error at the next synchronisation.
	table := p.weight(kernels.BF16, 0, [2]int{}, 10, 8)
	ids := p.i32([]int32{10}, 1)
	out := p.poisoned(1, 8)
	if err := p.gpu.Embed(out.g, table.g, ids.g); err != nil {
		t.Fatal(err)
	}
	if _, err := p.gpu.Download(out.g); err == nil {
		t.Fatal("embedding id 10 of 10 was not reported")
	}
	if _, err := p.gpu.Download(out.g); err != nil {
		t.Fatalf("error flag not cleared: %v", err)
	}
}

// wideGemmModes are the activation formats: hi+lo bf16 halves on the
// cuBLAS path and hi+lo f16 planes for e4m3 GEMVs ("exact"), and bf16 once
// (Options.FastWideGemm) with one f16 plane for e4m3 GEMVs (the default).
var wideGemmModes = []backendMode{{"exact", Options{ExactFP8Activations: true}}, {"fast", Options{FastWideGemm: true}}}

// prefillModes are the prefill attention kernels: attention_flash (per GQA
// group) and, with NoFlashAttention, per q head.
var prefillModes = []backendMode{{"flash", Options{}}, {"per-head", Options{NoFlashAttention: true}}}

// backendMode is a GPU backend configuration that a twin test runs under.
type backendMode struct {
	name string
	opt  Options
}

// forModes runs twin as one subtest per mode, each on a pair whose GPU
// backend has that mode's options.
func forModes(t *testing.T, modes []backendMode, twin func(*testing.T, *pairT)) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) { twin(t, newPairOpt(t, m.opt)) })
	}
}

// fp8Tol is the tolerance of an e4m3 result: activations rounded once to
// f16 (11 bits) unless Options.ExactFP8Activations.
func fp8Tol(p *pairT, dt kernels.DType, tol float64) float64 {
	if dt != kernels.F8E4M3 || p.gpu.opt.ExactFP8Activations {
		return tol
	}
	return max(tol, 2e-3)
}

// wideTol is the tolerance of a result that went through the cuBLAS path:
// bf16 activations round each input to 8 bits of mantissa.
func wideTol(p *pairT, exactTol float64) float64 {
	if !p.gpu.opt.FastWideGemm {
		return exactTol
	}
	return 1e-2
}

func TestLinearTwin(t *testing.T) { forModes(t, wideGemmModes, linearTwin) }

func linearTwin(t *testing.T, p *pairT) {
	type wcase struct {
		name   string
		dt     kernels.DType
		layout kernels.ScaleLayout
		block  [2]int
	}
	wcases := []wcase{
		{"f32", kernels.F32, 0, [2]int{}},
		{"bf16", kernels.BF16, 0, [2]int{}},
		{"fp8-channel", kernels.F8E4M3, kernels.ScalePerChannel, [2]int{}},
		{"fp8-block128", kernels.F8E4M3, kernels.ScaleBlock, [2]int{128, 128}},
		{"fp8-block3x5", kernels.F8E4M3, kernels.ScaleBlock, [2]int{3, 5}},
	}
	shapes := [][3]int{{1, 37, 83}, {3, 130, 264}, {2, 77, 2056}, {8, 1000, 136}, {6, 9000, 264}, {9, 1000, 136}, {17, 531, 1032}, {40, 77, 520},
		{1, 4100, 256}, {5, 300, 512}, {12, 130, 384}, {16, 77, 1024}, {40, 77, 512}, {64, 130, 256}, // K % 32 == 0: the tensor-core GEMV
		{3, 130, 352},                                  // K % 64 == 32: e4m3 on the block GEMV, bf16 on the streamed one
		{1, 16, 4096}, {2, 9, 12288}, {11, 1030, 1408}, // few row groups: K split over many warps
		{24, 1030, 2048}, {64, 260, 4096}, {33, 16, 1024}, // e4m3 17–64 tokens: the wide kernel, K split or not
		{80, 130, 272}, {70, 132, 256}} // cuBLAS: 16-wide e4m3 expansion, N odd and N % 4 == 0 in finish_gemm
	for _, wc := range wcases {
		for _, sh := range shapes {
			T, N, K := sh[0], sh[1], sh[2]
			t.Run(fmt.Sprintf("%s/T%d_N%d_K%d", wc.name, T, N, K), func(t *testing.T) {
				p := p.sub(t)
				w := p.weight(wc.dt, wc.layout, wc.block, N, K)
				x := p.f32(1, T, K)
				bias := p.f32(0.5, N)
				out := p.poisoned(T, N)
				must(t, "linear", p.cpu.Linear(out.c, x.c, w.c, bias.c), p.gpu.Linear(out.g, x.g, w.g, bias.g))
				tol := 5e-5
				if T > p.gpu.opt.GemvMaxTokens && p.gpu.blas != nil && wc.dt != kernels.F32 && !(T <= mmaMaxTokens && K%32 == 0 && (wc.layout != kernels.ScaleBlock || wc.block[1]%32 == 0)) {
					// cuBLAS path: activations (and block-scaled weights) as two bf16 halves
					tol = wideTol(p, 1e-4)
				}
				tol = fp8Tol(p, wc.dt, tol)
				p.check("linear", out, tol)
				out2 := p.poisoned(T, N)
				must(t, "linear without bias", p.cpu.Linear(out2.c, x.c, w.c, nil), p.gpu.Linear(out2.g, x.g, w.g, nil))
				p.check("linear without bias", out2, tol)
			})
		}
	}
}

func TestRouteTwin(t *testing.T) {
	p := newPair(t)
	for _, rp := range []kernels.RouterParams{
		{Experts: 40, TopK: 6, Groups: 4, TopKGroups: 2, NormTopK: true, Scale: 2.5},
		{Experts: 128, TopK: 8, Groups: 1, TopKGroups: 1, NormTopK: true, Scale: 1},
		{Experts: 13, TopK: 3, Groups: 1, TopKGroups: 1, NormTopK: false, Scale: 1.5},
	} {
		t.Run(fmt.Sprintf("E%d_K%d_G%d", rp.Experts, rp.TopK, rp.Groups), func(t *testing.T) {
			p := p.sub(t)
			T := 67
			logits := p.f32(4, T, rp.Experts)
			bias := p.f32(0.1, rp.Experts)
			ids := p.i32(make([]int32, T*rp.TopK), T, rp.TopK)
			wts := p.poisoned(T, rp.TopK)
			must(t, "route", p.cpu.Route(ids.c, wts.c, logits.c, bias.c, rp), p.gpu.Route(ids.g, wts.g, logits.g, bias.g, rp))
			wantIDs, _ := p.cpu.DownloadI32(ids.c)
			gotIDs, err := p.gpu.DownloadI32(ids.g)
			must(t, "download", err)
			for i := range wantIDs {
				if wantIDs[i] != gotIDs[i] {
					t.Fatalf("ids differ at %d: gpu %v cpu %v", i, gotIDs[:rp.TopK*2], wantIDs[:rp.TopK*2])
				}
			}
			p.check("route weights", wts, 1e-6)
		})
	}
}

func TestMoETwin(t *testing.T) {
	forModes(t, wideGemmModes, func(t *testing.T, p *pairT) {
		p.gpu.fp8Chunk = 4 // FP8 experts expanded in several chunks
		moeTwin(t, p)
	})
}

func moeTwin(t *testing.T, p *pairT) {
	type mcase struct {
		name   string
		dt     kernels.DType
		layout kernels.ScaleLayout
		block  [2]int
	}
	for _, mc := range []mcase{
		{"bf16", kernels.BF16, 0, [2]int{}},
		{"fp8-channel", kernels.F8E4M3, kernels.ScalePerChannel, [2]int{}},
		{"fp8-block", kernels.F8E4M3, kernels.ScaleBlock, [2]int{16, 32}},
		{"fp8-block128", kernels.F8E4M3, kernels.ScaleBlock, [2]int{128, 128}},
	} {
		for _, T := range []int{1, 2, 5, 12, 33, 200} {
			t.Run(fmt.Sprintf("%s/T%d", mc.name, T), func(t *testing.T) {
				p := p.sub(t)
				E, K, H, I := 11, 3, 72, 37
				if mc.dt == kernels.F8E4M3 {
					H, I = 96, 40
				}
				if T == 5 || T == 33 { // multiples of 32: the tensor-core kernels (T 5), the wide GEMMs or CUDA cores (T 33)
					H, I = 128, 64
				}
				if T == 2 || T == 12 { // the streamed kernels, K split over warps (T 2) or not, 2 token tiles (T 12)
					H, I = 1024, 320
				}
				ce := make([]*kernels.Expert, E)
				ge := make([]*kernels.Expert, E)
				for e := range E {
					if e == 4 || e == 9 { // not on this device
						continue
					}
					g := p.weight(mc.dt, mc.layout, mc.block, I, H)
					u := p.weight(mc.dt, mc.layout, mc.block, I, H)
					d := p.weight(mc.dt, mc.layout, mc.block, H, I)
					ce[e] = &kernels.Expert{Gate: g.c, Up: u.c, Down: d.c}
					ge[e] = &kernels.Expert{Gate: g.g, Up: u.g, Down: d.g}
				}
				idv := make([]int32, T*K)
				for tk := 0; tk < T; tk++ {
					perm := p.rng.Perm(E)
					for j := 0; j < K; j++ {
						idv[tk*K+j] = int32(perm[j])
					}
				}
				ids := p.i32(idv, T, K)
				wts := p.f32(1, T, K)
				x := p.f32(1, T, H)
				out := p.poisoned(T, H)
				must(t, "moe", p.cpu.MoE(out.c, x.c, ids.c, wts.c, ce), p.gpu.MoE(out.g, x.g, ids.g, wts.g, ge))
				tol := 5e-5
				if T*K >= 16*(E-2) {
					// The cuBLAS path: bf16 hi+lo activations, FP8 experts
					// expanded exactly (per-channel) or as hi+lo (block scales).
					tol = wideTol(p, 1e-4)
				}
				p.check("moe", out, fp8Tol(p, mc.dt, tol))

				// The shared expert fused into the streamed kernels (where
				// they run) equals MoE + the shared MLP on the CPU.
				sg := p.weight(mc.dt, mc.layout, mc.block, I, H)
				su := p.weight(mc.dt, mc.layout, mc.block, I, H)
				sd := p.weight(mc.dt, mc.layout, mc.block, H, I)
				fused := p.poisoned(T, H)
				done, err := p.gpu.MoEWithShared(fused.g, x.g, ids.g, wts.g, ge, &kernels.Expert{Gate: sg.g, Up: su.g, Down: sd.g})
				if err != nil {
					t.Fatal(err)
				}
				wide := T*K >= 16*(E-2) && T > p.gpu.opt.GemvMaxTokens && p.gpu.blas != nil
				if want := T <= mmaMaxTokens && p.gpu.sgOK(weightInfoOf(t, sg.g)) && p.gpu.sgOK(weightInfoOf(t, sd.g)) && !wide; done != want {
					t.Fatalf("MoEWithShared handled=%v, want %v", done, want)
				}
				if !done {
					return
				}
				gc, uc, yc := p.poisoned(T, I), p.poisoned(T, I), p.poisoned(T, H)
				must(t, "shared gate", p.cpu.Linear(gc.c, x.c, sg.c, nil), nil)
				must(t, "shared up", p.cpu.Linear(uc.c, x.c, su.c, nil), nil)
				must(t, "shared silu", p.cpu.SiluMul(gc.c, gc.c, uc.c), nil)
				must(t, "shared down", p.cpu.Linear(yc.c, gc.c, sd.c, nil), nil)
				must(t, "shared add", p.cpu.Add(fused.c, out.c, yc.c), nil)
				p.check("moe+shared", fused, fp8Tol(p, mc.dt, tol))
			})
		}
	}
}

// attentionBatch lays out several sequences, each with some cached tokens
// and some new ones (a mixed prefill/decode step), over shuffled blocks.
func attentionBatch(p *pairT, newTok, cached []int, blockSize, numBlocks int) *kernels.Batch {
	free := p.rng.Perm(numBlocks)
	b := &kernels.Batch{}
	for s := range newTok {
		ctx := cached[s] + newTok[s]
		nb := (ctx + blockSize - 1) / blockSize
		table := make([]int32, nb)
		for i := range table {
			table[i] = int32(free[0])
			free = free[1:]
		}
		for j := 0; j < newTok[s]; j++ {
			pos := cached[s] + j
			b.Positions = append(b.Positions, int32(pos))
			b.SeqIndex = append(b.SeqIndex, int32(s))
			b.Slots = append(b.Slots, table[pos/blockSize]*int32(blockSize)+int32(pos%blockSize))
		}
		b.BlockTables = append(b.BlockTables, table)
		b.ContextLens = append(b.ContextLens, int32(ctx))
	}
	return b
}

func TestAttentionTwin(t *testing.T) { forModes(t, prefillModes, attentionTwin) }

// attentionTwin runs decode, prefill and chunked-prefill batches; bf16-cache
// prefill goes to attention_flash or, with NoFlashAttention, attention_mma.
func attentionTwin(t *testing.T, p *pairT) {
	type acase struct {
		heads, kv, d, rot int
		qknorm            bool
		newTok, cached    []int
	}
	for _, ac := range []acase{
		{4, 2, 32, 16, false, []int{7, 1, 1}, []int{0, 40, 3}},
		{12, 4, 64, 32, true, []int{1, 1, 1}, []int{700, 5, 129}},
		{24, 2, 128, 64, true, []int{33, 1}, []int{0, 1500}},
		{96, 8, 128, 64, false, []int{1, 1, 5}, []int{4095, 17, 300}}, // GLM-4.5's heads: 12 per kv head
		{40, 2, 64, 32, false, []int{2, 1}, []int{90, 1000}},          // 20 per kv head: the CUDA-core kernel
		{12, 4, 64, 32, true, []int{20, 40, 3}, []int{30, 0, 7}},      // chunked prefill: 16-token tiles (bf16)
	} {
		for _, kvdt := range []kernels.DType{kernels.F32, kernels.BF16} {
			t.Run(fmt.Sprintf("h%d_kv%d_d%d_%v", ac.heads, ac.kv, ac.d, kvdt), func(t *testing.T) {
				p := p.sub(t)
				const bs, nblocks = 16, 400
				batch := attentionBatch(p, ac.newTok, ac.cached, bs, nblocks)
				T := batch.Tokens()
				slots := nblocks * bs
				// Same cache contents on both sides: random history, then this step's writes.
				hist := p.randF32(slots*ac.kv*ac.d, 1)
				hist2 := p.randF32(slots*ac.kv*ac.d, 1)
				if kvdt == kernels.BF16 { // the CPU holds the bf16-rounded values in f32
					for i := range hist {
						hist[i] = math.Float32frombits(math.Float32bits(hist[i]) &^ 0xffff)
						hist2[i] = math.Float32frombits(math.Float32bits(hist2[i]) &^ 0xffff)
					}
				}
				kc := p.upload(kernels.F32, f32Bytes(hist), slots, ac.kv, ac.d)
				vc := p.upload(kernels.F32, f32Bytes(hist2), slots, ac.kv, ac.d)
				gk, gv := kc.g, vc.g
				if kvdt == kernels.BF16 {
					gk = bf16Tensor(t, p.gpu, hist, slots, ac.kv, ac.d)
					gv = bf16Tensor(t, p.gpu, hist2, slots, ac.kv, ac.d)
				}
				ccache := &kernels.KVCache{K: kc.c, V: vc.c, BlockSize: bs, KVHeads: ac.kv, HeadDim: ac.d}
				gcache := &kernels.KVCache{K: gk, V: gv, BlockSize: bs, KVHeads: ac.kv, HeadDim: ac.d}
				q, k, v := p.f32(1, T, ac.heads*ac.d), p.f32(1, T, ac.kv*ac.d), p.f32(1, T, ac.kv*ac.d)
				var qn, kn twin
				if ac.qknorm {
					qn, kn = p.f32(1, ac.d), p.f32(1, ac.d)
				}
				cm, err := p.cpu.UploadBatch(batch)
				must(t, "batch", err)
				gm, err := p.gpu.UploadBatch(batch)
				must(t, "batch", err)
				rope := kernels.RopeParams{Heads: ac.heads, HeadDim: ac.d, RotaryDim: ac.rot, Theta: 1e6}
				must(t, "qk-norm-rope-kv",
					p.cpu.QKNormRopeKV(q.c, k.c, v.c, qn.c, kn.c, 1e-5, rope, ac.kv, ccache, cm),
					p.gpu.QKNormRopeKV(q.g, k.g, v.g, qn.g, kn.g, 1e-5, rope, ac.kv, gcache, gm))
				p.check("rotated q", q, 2e-6)
				p.check("rotated k", k, 2e-6)
				tol := 2e-5
				if kvdt == kernels.BF16 {
					tol = 1e-2 // this step's k/v are rounded to bf16 in the cache
				} else {
					p.check("k cache", twin{kc.c, gk}, 2e-6)
				}
				out := p.poisoned(T, ac.heads*ac.d)
				ap := kernels.AttentionParams{Heads: ac.heads, KVHeads: ac.kv, HeadDim: ac.d, Scale: float32(1 / math.Sqrt(float64(ac.d)))}
				must(t, "attention", p.cpu.Attention(out.c, q.c, ccache, ap, cm), p.gpu.Attention(out.g, q.g, gcache, ap, gm))
				p.check("attention", out, tol)
			})
		}
	}
}

func bf16Tensor(t *testing.T, b *Backend, v []float32, shape ...int) *kernels.Tensor {
	t.Helper()
	raw := make([]byte, 2*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint16(raw[2*i:], uint16(math.Float32bits(x)>>16))
	}
	x, err := b.NewTensor(kernels.BF16, shape...)
	must(t, "bf16 tensor", err)
	must(t, "bf16 upload", b.Upload(x, raw))
	return x
}

func TestAllocatorReuses(t *testing.T) {
	b := gpu(t, Options{})
	x, err := b.NewTensor(kernels.F32, 1000)
	must(t, "alloc", err)
	p := x.Impl.(*buf).ptr
	b.Free(x)
	y, err := b.NewTensor(kernels.F32, 999)
	must(t, "alloc", err)
	if y.Impl.(*buf).ptr != p {
		t.Fatalf("freed block not reused")
	}
	b.Free(y)
}

// TestLinearLargeActivations: the e4m3 tensor-core path carries activations
// in f16 planes scaled by a power of two; values far beyond f16's range must
// still come out right.
func TestLinearLargeActivations(t *testing.T) {
	p := newPair(t)
	for _, scale := range []float32{1e-3, 3e5} {
		w := p.weight(kernels.F8E4M3, kernels.ScalePerChannel, [2]int{}, 200, 256)
		x := p.f32(scale, 3, 256)
		out := p.poisoned(3, 200)
		must(t, "linear", p.cpu.Linear(out.c, x.c, w.c, nil), p.gpu.Linear(out.g, x.g, w.g, nil))
		p.check(fmt.Sprintf("linear with |x| ~ %g", scale), out, fp8Tol(p, kernels.F8E4M3, 5e-5))
	}
}

// TestFlashAttentionTwin runs prefill batches through attention_flash (and,
// with GLMTOPO_FLASH=old, attention_flash16) against the CPU twin: GLM-4.5
// Air's group of 12 q heads per kv head at head dim 128 over a 1000-token
// prompt and a chunked continuation beside a short prompt and a decode
// token, and groups/dims/block sizes that leave warps idle, put several
// sequences in one block or fall back to the older kernel.
func TestFlashAttentionTwin(t *testing.T) {
	p := newPair(t)
	for _, fc := range []prefillCase{
		{"air_prompt1000", 24, 2, 128, 16, 4, []int{1000}, []int{0}},
		{"air_chunked", 24, 2, 128, 16, 4, []int{300, 37, 1}, []int{1000, 0, 77}},
		{"g16_d128", 32, 2, 128, 16, 1, []int{130, 20}, []int{70, 0}},
		{"g2_d64_4seqs", 4, 2, 64, 16, 1, []int{70, 33, 16, 5}, []int{0, 20, 200, 9}},
		{"g3_d64_bs32", 9, 3, 64, 32, 2, []int{50, 45}, []int{3, 100}},
		{"g5_d32", 10, 2, 32, 16, 1, []int{40, 7, 29}, []int{0, 60, 15}},
		{"g4_d96", 8, 2, 96, 16, 2, []int{90, 20}, []int{0, 33}},
		{"g1_d32_bs8", 2, 2, 32, 8, 1, []int{150, 3}, []int{10, 0}},
		{"g12_d128_bs12", 12, 1, 128, 12, 1, []int{40}, []int{30}}, // not 2^k positions per block: attention_flash16
	} {
		t.Run(fc.name, func(t *testing.T) {
			p := p.sub(t)
			r := fc.run(t, p, func(slots int) (c, g *kernels.KVCache) {
				hist := [2][]float32{p.randF32(slots*fc.kv*fc.d, 1), p.randF32(slots*fc.kv*fc.d, 1)}
				var ct, gt [2]*kernels.Tensor
				for i, h := range hist {
					for j := range h { // the CPU holds the bf16 values in f32
						h[j] = math.Float32frombits(math.Float32bits(h[j]) &^ 0xffff)
					}
					ct[i] = p.upload(kernels.F32, f32Bytes(h), slots, fc.kv, fc.d).c
					gt[i] = bf16Tensor(t, p.gpu, h, slots, fc.kv, fc.d)
				}
				return &kernels.KVCache{K: ct[0], V: ct[1], BlockSize: fc.bs, KVHeads: fc.kv, HeadDim: fc.d},
					&kernels.KVCache{K: gt[0], V: gt[1], BlockSize: fc.bs, KVHeads: fc.kv, HeadDim: fc.d}
			})
			p.check("attention_flash", r.out, 1e-2)
			t.Setenv("GLMTOPO_FLASH", "old")
			old := p.poisoned(r.T, fc.heads*fc.d)
			must(t, "attention (old)", p.gpu.Attention(old.g, r.q.g, r.gcache, r.ap, r.gm))
			p.check("attention_flash16", twin{r.out.c, old.g}, 1e-2)
		})
	}
}

// prefillCase is one prefill attention batch for the twin tests: heads q
// heads over kv kv heads of dimension d in blocks of bs positions, q of
// magnitude qScale, and per sequence newTok[i] new tokens after cached[i].
type prefillCase struct {
	name             string
	heads, kv, d, bs int
	qScale           float32 // large: peaked softmax, the running max moves
	newTok, cached   []int
}

// prefillRun is what prefillCase.run leaves for a test to check further.
type prefillRun struct {
	T      int // tokens in the batch
	out, q twin
	gcache *kernels.KVCache
	ap     kernels.AttentionParams
	gm     kernels.BatchMeta
}

// run lays out fc's batch on both backends (asserting it takes the prefill
// tiles), fills the caches that cache builds for slots positions, and runs
// attention on both into r.out.
func (fc prefillCase) run(t *testing.T, p *pairT, cache func(slots int) (c, g *kernels.KVCache)) prefillRun {
	t.Helper()
	nblocks := 5
	for i := range fc.newTok {
		nblocks += (fc.newTok[i] + fc.cached[i] + fc.bs - 1) / fc.bs
	}
	batch := attentionBatch(p, fc.newTok, fc.cached, fc.bs, nblocks)
	T := batch.Tokens()
	if tiles := len(prefillTiles(batch)) / 2; tiles*4 > T {
		t.Fatalf("%d tiles for %d tokens: not the prefill layout", tiles, T)
	}
	ccache, gcache := cache(nblocks * fc.bs)
	q := p.f32(fc.qScale, T, fc.heads*fc.d)
	cm, err := p.cpu.UploadBatch(batch)
	must(t, "batch", err)
	gm, err := p.gpu.UploadBatch(batch)
	must(t, "batch", err)
	ap := kernels.AttentionParams{Heads: fc.heads, KVHeads: fc.kv, HeadDim: fc.d, Scale: float32(1 / math.Sqrt(float64(fc.d)))}
	out := p.poisoned(T, fc.heads*fc.d)
	must(t, "attention", p.cpu.Attention(out.c, q.c, ccache, ap, cm), p.gpu.Attention(out.g, q.g, gcache, ap, gm))
	return prefillRun{T: T, out: out, q: q, gcache: gcache, ap: ap, gm: gm}
}

// BenchmarkFlashAttentionAir times causal prefill attention at GLM-4.5 Air's
// shapes (96 q heads, 8 kv heads, head dim 128, bf16 cache in blocks of 16)
// over one 8192-token prompt, for attention_flash ("new") and
// attention_flash16 ("old", GLMTOPO_FLASH=old), in ms per layer and TFLOP/s
// of causal attention (4·heads·d·T²/2). Run with -test.bench FlashAttentionAir
// -test.benchtime 20x.
func BenchmarkFlashAttentionAir(b *testing.B) {
	const heads, kv, d, T, bs = 96, 8, 128, 8192, 16
	g := gpu(b, Options{})
	tensor := func(dt kernels.DType, seed uint64, shape ...int) *kernels.Tensor {
		x, err := g.NewTensor(dt, shape...)
		if err != nil {
			b.Fatal(err)
		}
		if err := g.Fill(x, seed, 1); err != nil {
			b.Fatal(err)
		}
		return x
	}
	q, out := tensor(kernels.F32, 1, T, heads*d), tensor(kernels.F32, 2, T, heads*d)
	cache := &kernels.KVCache{K: tensor(kernels.BF16, 3, T, kv, d), V: tensor(kernels.BF16, 4, T, kv, d), BlockSize: bs, KVHeads: kv, HeadDim: d}
	batch := &kernels.Batch{BlockTables: [][]int32{make([]int32, T/bs)}, ContextLens: []int32{T}}
	for i := range T / bs {
		batch.BlockTables[0][i] = int32(T/bs - 1 - i) // blocks out of order, as after some churn
	}
	for pos := range T {
		batch.Positions = append(batch.Positions, int32(pos))
		batch.SeqIndex = append(batch.SeqIndex, 0)
		batch.Slots = append(batch.Slots, batch.BlockTables[0][pos/bs]*bs+int32(pos%bs))
	}
	meta, err := g.UploadBatch(batch)
	if err != nil {
		b.Fatal(err)
	}
	ap := kernels.AttentionParams{Heads: heads, KVHeads: kv, HeadDim: d, Scale: float32(1 / math.Sqrt(d))}
	for _, kernel := range []string{"new", "old"} {
		b.Run(kernel, func(b *testing.B) {
			if kernel == "old" {
				b.Setenv("GLMTOPO_FLASH", "old")
			}
			if err := g.Attention(out, q, cache, ap, meta); err != nil { // compile, load, warm up
				b.Fatal(err)
			}
			tm, err := g.NewTimer()
			if err != nil {
				b.Fatal(err)
			}
			defer tm.Close()
			b.ResetTimer()
			must2 := func(err error) {
				if err != nil {
					b.Fatal(err)
				}
			}
			must2(tm.Start())
			for range b.N {
				must2(g.Attention(out, q, cache, ap, meta))
			}
			must2(tm.Stop())
			sec, err := tm.Seconds()
			must2(err)
			per := sec / float64(b.N)
			b.ReportMetric(per*1e3, "ms/layer")
			b.ReportMetric(4*heads*d*float64(T)*T/2/per/1e12, "TFLOP/s")
		})
	}
}

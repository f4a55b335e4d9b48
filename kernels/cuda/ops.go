package cuda

import (
	"fmt"
	"math"
	"math/bits"
	"os"

	"github.com/glmtopo/glmtopo/kernels"
)

var (
	b256  = [3]uint32{256, 1, 1}
	b128  = [3]uint32{128, 1, 1}
	b1024 = [3]uint32{1024, 1, 1}
)

func rows(n int) [3]uint32 { return [3]uint32{uint32(n), 1, 1} }

// op runs fn with the context current.
func (b *Backend) op(fn func() error) error {
	if err := b.enter(); err != nil {
		return err
	}
	defer b.leave()
	return fn()
}

func (b *Backend) Embed(out, table, ids *kernels.Tensor) error {
	var ta tensorArgs
	o := ta.ptr(out, kernels.F32, "embed output")
	idp := ta.ptr(ids, kernels.I32, "embed ids")
	if ta.err != nil {
		return ta.err
	}
	tb, err := devBuf(table, "embedding table")
	if err != nil {
		return err
	}
	if len(table.Shape) != 2 || (table.DType != kernels.F32 && table.DType != kernels.BF16) {
		return fmt.Errorf("cuda: embed table must be 2-D f32 or bf16, got %v %v", table.DType, table.Shape)
	}
	h := table.Shape[1]
	T := ids.Elements()
	if out.Cols() != h || out.Rows() != T {
		return fmt.Errorf("cuda: embed shapes: out %v, table %v, %d ids", out.Shape, table.Shape, T)
	}
	isBF16 := int32(0)
	if table.DType == kernels.BF16 {
		isBF16 = 1
	}
	return b.op(func() error {
		return b.launch("ops", "embed_rows", rows(T), b256, 0, o, tb.ptr, isBF16, idp, int32(T), int32(h), int32(table.Shape[0]), b.errFlag.ptr)
	})
}

func (b *Backend) rmsnorm(out, x, add, w *kernels.Tensor, eps float32) error {
	var ta tensorArgs
	o := ta.ptr(out, kernels.F32, "rmsnorm output")
	xp := ta.ptr(x, kernels.F32, "rmsnorm input")
	wp := ta.ptr(w, kernels.F32, "rmsnorm weight")
	ap := ta.opt(add, "residual addend")
	if ta.err != nil {
		return ta.err
	}
	h := w.Elements()
	if x.Cols() != h || out.Elements() != x.Elements() || (add != nil && add.Elements() != x.Elements()) {
		return fmt.Errorf("cuda: rmsnorm shapes: x %v, w %d, out %v", x.Shape, h, out.Shape)
	}
	threads := uint32(min(1024, max(32, (h+31)/32*32)))
	return b.op(func() error {
		return b.launch("ops", "rmsnorm", rows(x.Rows()), [3]uint32{threads, 1, 1}, 0, o, xp, ap, wp, int32(h), eps)
	})
}

func (b *Backend) RMSNorm(out, x, w *kernels.Tensor, eps float32) error {
	return b.rmsnorm(out, x, nil, w, eps)
}

func (b *Backend) AddRMSNorm(resid, x, out, w *kernels.Tensor, eps float32) error {
	if x == nil {
		return fmt.Errorf("cuda: add-rmsnorm addend is nil")
	}
	return b.rmsnorm(out, resid, x, w, eps)
}

// elementwise runs a (out, a, b, n) kernel after checking the shapes agree.
func (b *Backend) elementwise(kernel, what string, out, x, y *kernels.Tensor) error {
	var ta tensorArgs
	o := ta.ptr(out, kernels.F32, what+" output")
	a := ta.ptr(x, kernels.F32, what+" input")
	c := ta.ptr(y, kernels.F32, what+" input")
	if ta.err != nil {
		return ta.err
	}
	n := x.Elements()
	if y.Elements() != n || out.Elements() != n {
		return fmt.Errorf("cuda: %s shapes: %v, %v -> %v", what, x.Shape, y.Shape, out.Shape)
	}
	return b.op(func() error {
		return b.launch("ops", kernel, grid1(int64(n), 256*4), b256, 0, o, a, c, int64(n))
	})
}

func (b *Backend) SiluMul(out, gate, up *kernels.Tensor) error {
	return b.elementwise("silu_mul", "silu-mul", out, gate, up)
}

func (b *Backend) Add(out, x, y *kernels.Tensor) error {
	return b.elementwise("add_f32", "add", out, x, y)
}

func (b *Backend) Concat(out, x, y *kernels.Tensor) error {
	var ta tensorArgs
	o := ta.ptr(out, kernels.F32, "concat output")
	a := ta.ptr(x, kernels.F32, "concat a")
	c := ta.ptr(y, kernels.F32, "concat b")
	if ta.err != nil {
		return ta.err
	}
	na, nc, r := x.Cols(), y.Cols(), x.Rows()
	if y.Rows() != r || out.Rows() != r || out.Cols() != na+nc {
		return fmt.Errorf("cuda: concat shapes: %v ++ %v -> %v", x.Shape, y.Shape, out.Shape)
	}
	return b.op(func() error {
		return b.launch("ops", "concat_rows", rows(r), b256, 0, o, a, c, int32(r), int32(na), int32(nc))
	})
}

func (b *Backend) QKNormRopeKV(q, k, v, qNorm, kNorm *kernels.Tensor, eps float32, rope kernels.RopeParams, kvHeads int, cache *kernels.KVCache, meta kernels.BatchMeta) error {
	m, ok := meta.(*batchMeta)
	if !ok {
		return fmt.Errorf("cuda: foreign batch metadata %T", meta)
	}
	var ta tensorArgs
	qp := ta.ptr(q, kernels.F32, "q")
	kp := ta.ptr(k, kernels.F32, "k")
	vp := ta.ptr(v, kernels.F32, "v")
	qn := ta.opt(qNorm, "q norm")
	kn := ta.opt(kNorm, "k norm")
	if ta.err != nil {
		return ta.err
	}
	kc, vc, err := cacheBufs(cache, "qk-norm-rope")
	if err != nil {
		return err
	}
	d, rot, T := rope.HeadDim, rope.RotaryDim, m.T
	if q.Rows() != T || q.Cols() != rope.Heads*d || k.Cols() != kvHeads*d || v.Cols() != kvHeads*d || k.Rows() != T || v.Rows() != T {
		return fmt.Errorf("cuda: qk-norm-rope shapes: q %v k %v v %v for %d tokens", q.Shape, k.Shape, v.Shape, T)
	}
	if rot > d || rot%2 != 0 || rot > 256 {
		return fmt.Errorf("cuda: rotary dim %d invalid for head dim %d (at most 256)", rot, d)
	}
	if cache.KVHeads != kvHeads || cache.HeadDim != d || cache.K.DType != cache.V.DType {
		return fmt.Errorf("cuda: KV cache holds %d heads of %d (%v/%v), layer has %d of %d", cache.KVHeads, cache.HeadDim, cache.K.DType, cache.V.DType, kvHeads, d)
	}
	kernel, err := kvWriteKernel(cache)
	if err != nil {
		return err
	}
	nslots := int64(cache.K.Elements() / (kvHeads * d))
	return b.op(func() error {
		// One warp per head, 4 heads per block (see qk_norm_rope_kv_impl).
		grid := [3]uint32{uint32(T), uint32((rope.Heads + kvHeads + 3) / 4), 1}
		args := []any{qp, kp, vp, qn, kn, eps, int32(rope.Heads), int32(kvHeads),
			int32(d), int32(rot), rope.Theta, m.at(m.pos), m.at(m.slots), nslots, kc.ptr, vc.ptr, b.errFlag.ptr}
		if cache.K.DType == kernels.F8E4M3 {
			ks, vs := cache.Scales()
			args = append(args, ks, vs)
		}
		return b.launch("ops", kernel, grid, b128, 0, args...)
	})
}

// cacheBufs is the device memory of a layer's K and V caches.
func cacheBufs(cache *kernels.KVCache, op string) (k, v *buf, err error) {
	if cache == nil || cache.K == nil || cache.V == nil {
		return nil, nil, fmt.Errorf("cuda: %s: no KV cache", op)
	}
	if k, err = devBuf(cache.K, "k cache"); err != nil {
		return nil, nil, err
	}
	v, err = devBuf(cache.V, "v cache")
	return k, v, err
}

// attnWarps × 32 positions is what one block of attention_split walks per step.
const attnWarps = 4

func (b *Backend) Attention(out, q *kernels.Tensor, cache *kernels.KVCache, p kernels.AttentionParams, meta kernels.BatchMeta) error {
	m, ok := meta.(*batchMeta)
	if !ok {
		return fmt.Errorf("cuda: foreign batch metadata %T", meta)
	}
	var ta tensorArgs
	o := ta.ptr(out, kernels.F32, "attention output")
	qp := ta.ptr(q, kernels.F32, "q")
	if ta.err != nil {
		return ta.err
	}
	kc, vc, err := cacheBufs(cache, "attention")
	if err != nil {
		return err
	}
	d, T := p.HeadDim, m.T
	if p.KVHeads <= 0 || p.Heads%p.KVHeads != 0 || q.Cols() != p.Heads*d || q.Rows() != T || out.Elements() != q.Elements() {
		return fmt.Errorf("cuda: attention shapes: q %v out %v heads %d/%d", q.Shape, out.Shape, p.Heads, p.KVHeads)
	}
	if d%32 != 0 || d > 256 {
		return fmt.Errorf("cuda: attention needs a head dim that is a multiple of 32 up to 256, got %d", d)
	}
	if cache.KVHeads != p.KVHeads || cache.HeadDim != d {
		return fmt.Errorf("cuda: KV cache holds %d heads of %d, attention wants %d of %d", cache.KVHeads, cache.HeadDim, p.KVHeads, d)
	}
	g := p.Heads / p.KVHeads
	kind, err := kvKind(cache) // 0 f32, 1 bf16, 2 e4m3
	if err != nil {
		return err
	}
	if T == 0 {
		return nil
	}
	// Split the context so that small batches still fill the GPU.
	nsplit := 1
	if blocks := p.KVHeads * T; blocks < 4*b.sms {
		nsplit = min((4*b.sms+blocks-1)/blocks, (m.maxCtx+attnWarps*32-1)/(attnWarps*32))
	}
	splitLen := (m.maxCtx + nsplit - 1) / nsplit
	splitLen = (splitLen + 31) / 32 * 32
	nsplit = max(1, (m.maxCtx+splitLen-1)/splitLen)
	key := fmt.Sprintf("attn_g%d_d%d_bf%d", g, d, kind)
	if kind == 2 {
		key = fmt.Sprintf("attn_g%d_d%d_fp8", g, d)
	}
	smem := 4 * (g*d + attnWarps*g*32 + attnWarps*g*d + attnWarps*g*2)
	// The tensor-core kernel takes bf16 and e4m3 caches with up to 16 q heads per kv head.
	useMMA := kind != 0 && g <= 16 && d <= 128 && !b.opt.NoTensorCoreAttention
	// attention_mma's dynamic shared memory (MMA_STAGES_BYTES, MMA_MERGE_BYTES in attention.cu).
	mmaSmem := max(attnWarps*2*(16*d+16*(d+8))*2, attnWarps*16*d*4+attnWarps*16*2*4)
	if kind == 2 {
		mmaSmem = max(attnWarps*2*16*((d+32)+(d+16)), attnWarps*16*d*4+attnWarps*16*2*4)
	}
	// Prefill layout (16 tokens per tile) when tiles are mostly full.
	prefill := m.nTiles*4 <= T
	scale := p.Scale * math.Log2E // the kernels work in log2 units (exp2)
	// An e4m3 cache: K's scale joins the softmax scale; V's is the kernels' last argument.
	var fp8Args []any
	if kind == 2 {
		ks, vs := cache.Scales()
		scale *= ks
		fp8Args = []any{vs}
	}
	return b.op(func() error {
		if _, ok := b.mods[key]; !ok {
			err := b.loadModule(key, source("common.cuh", "attention.cu"),
				append([]string{fmt.Sprintf("ATT_G=%d", g), fmt.Sprintf("ATT_D=%d", d)}, kvDefines(kind)...))
			if err != nil {
				return err
			}
			f, err := b.fn(key, "attention_split")
			if err != nil {
				return err
			}
			if useMMA {
				f, err := b.fn(key, "attention_mma")
				if err != nil {
					return err
				}
				if err := b.d.check(b.d.cuFuncSetAttribute(f, funcAttrMaxDynamicShared, int32(mmaSmem)), "attention shared memory"); err != nil {
					return fmt.Errorf("%w (head dim %d needs %d bytes)", err, d, mmaSmem)
				}
				const carveoutAttr = 9 // CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
				if err := b.d.check(b.d.cuFuncSetAttribute(f, carveoutAttr, 100), "attention carveout"); err != nil {
					return err
				}
			}
			if smem > 48<<10 && !useMMA {
				if err := b.d.check(b.d.cuFuncSetAttribute(f, funcAttrMaxDynamicShared, int32(smem)), "attention shared memory"); err != nil {
					return fmt.Errorf("%w (GQA group %d, head dim %d need %d bytes)", err, g, d, smem)
				}
			}
		}
		var part *buf
		var pacc, pml uintptr
		if nsplit > 1 {
			var err error
			rowsN := uintptr(T * p.Heads * nsplit)
			if part, err = b.pool.alloc(4 * rowsN * uintptr(d+2)); err != nil {
				return err
			}
			defer b.pool.put(part)
			pacc, pml = part.ptr, part.ptr+4*rowsN*uintptr(d)
		}
		grid := [3]uint32{uint32(p.KVHeads), uint32(T), uint32(nsplit)}
		var err error
		if useMMA && prefill && !b.opt.NoFlashAttention {
			// A whole GQA group per K/V tile. attention_flash's geometry, as
			// FL_* in flash.cu: warps of 32 q rows (one q head × two 16-token
			// tiles each), up to 4 q heads per block, K/V in stages of bn
			// positions. GLMTOPO_FLASH=old picks the earlier 16-rows-per-warp
			// kernel, attention_flash16 (A/B runs; bf16 caches: e4m3 ones
			// take attention_mma where attention_flash does not serve).
			variant := os.Getenv("GLMTOPO_FLASH")
			warps, stages, bn := 4, 2, 64
			// Its own module: a compile failure there leaves the others usable.
			fkey := fmt.Sprintf("flash_g%d_d%d_w%ds%db%d", g, d, warps, stages, bn)
			fsmem := 2 * (d + 8) * (warps*32 + 2*stages*bn)
			if kind == 2 { // one bf16 stage and a ring of e4m3 stages (flash.cu)
				fkey += "_fp8"
				fsmem = 2*(d+8)*(warps*32+2*bn) + stages*2*bn*d
			}
			_, loaded := b.mods[fkey]
			if err := b.loadModule(fkey, source("common.cuh", "attention.cu", "flash.cu"),
				append([]string{fmt.Sprintf("ATT_G=%d", g), fmt.Sprintf("ATT_D=%d", d),
					fmt.Sprintf("FL_W=%d", warps), fmt.Sprintf("FL_STAGES=%d", stages), fmt.Sprintf("FL_BN=%d", bn)}, kvDefines(kind)...)); err != nil {
				return err
			}
			hpb := min(g, 4)
			nsub, hg := 2*(warps/hpb), (g+hpb-1)/hpb
			if b.smemOptin == 0 {
				b.d.cuDeviceGetAttribute(&b.smemOptin, attrMaxSharedPerBlockOptin, b.dev)
			}
			fits := fsmem <= int(b.smemOptin)
			if !loaded && fits {
				f, err := b.fn(fkey, "attention_flash")
				if err != nil {
					return err
				}
				if err := b.d.check(b.d.cuFuncSetAttribute(f, funcAttrMaxDynamicShared, int32(fsmem)), "flash attention shared memory"); err != nil {
					return fmt.Errorf("%w (GQA group %d, head dim %d need %d bytes)", err, g, d, fsmem)
				}
				// Two blocks per SM (4 warps) need 2 × fsmem: the largest carveout.
				const carveoutAttr = 9 // CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
				if err := b.d.check(b.d.cuFuncSetAttribute(f, carveoutAttr, 100), "flash attention carveout"); err != nil {
					return err
				}
			}
			// Cache blocks of other than 2^k positions and GPUs with too
			// little shared memory per block take attention_flash16 too.
			bs := cache.BlockSize
			if variant != "old" && fits && bs > 0 && bs&(bs-1) == 0 {
				return b.launch(fkey, "attention_flash", [3]uint32{uint32(p.KVHeads * hg), uint32((m.nTiles + nsub - 1) / nsub), 1},
					[3]uint32{uint32(32 * warps), 1, 1}, uint32(fsmem), append([]any{o, qp, kc.ptr, vc.ptr, m.at(m.seq), m.at(m.pos), m.at(m.tables),
						int32(m.stride), int32(bits.TrailingZeros(uint(bs))), int32(p.Heads), int32(p.KVHeads), float32(scale),
						m.at(m.tileOff), int32(m.nTiles)}, fp8Args...)...)
			}
			if kind != 2 { // e4m3 caches fall through to attention_mma's prefill tiles
				return b.launch(fkey, "attention_flash16", [3]uint32{uint32(p.KVHeads), uint32(m.nTiles), 1},
					[3]uint32{uint32(32 * g), 1, 1}, 0, o, qp, kc.ptr, vc.ptr, m.at(m.seq), m.at(m.pos), m.at(m.tables),
					int32(m.stride), int32(cache.BlockSize), int32(p.Heads), int32(p.KVHeads), float32(scale), m.at(m.tileOff))
			}
		}
		if useMMA && prefill {
			// Rows are 16 tokens of one q head: K/V read once per 16 queries.
			err = b.launch(key, "attention_mma", [3]uint32{uint32(p.Heads), uint32(m.nTiles), 1}, b128, uint32(mmaSmem),
				append([]any{o, uintptr(0), uintptr(0), qp, kc.ptr, vc.ptr, m.at(m.seq), m.at(m.pos), m.at(m.tables), int32(m.stride),
					int32(cache.BlockSize), int32(p.Heads), int32(p.KVHeads), int32(g), float32(scale), int32(m.maxCtx), int32(1), m.at(m.tileOff)},
					fp8Args...)...)
			return err
		}
		if useMMA {
			err = b.launch(key, "attention_mma", grid, b128, uint32(mmaSmem),
				append([]any{o, pacc, pml, qp, kc.ptr, vc.ptr, m.at(m.seq), m.at(m.pos), m.at(m.tables), int32(m.stride),
					int32(cache.BlockSize), int32(p.Heads), int32(p.KVHeads), int32(g), float32(scale), int32(splitLen), int32(nsplit), uintptr(0)},
					fp8Args...)...)
		} else {
			err = b.launch(key, "attention_split", grid, b128, uint32(smem),
				append([]any{o, pacc, pml, qp, kc.ptr, vc.ptr, m.at(m.seq), m.at(m.pos), m.at(m.tables), int32(m.stride),
					int32(cache.BlockSize), int32(p.Heads), int32(p.KVHeads), float32(scale), int32(splitLen), int32(nsplit)},
					fp8Args...)...)
		}
		if err != nil || nsplit == 1 {
			return err
		}
		return b.launch(key, "attention_combine", [3]uint32{uint32(p.Heads), uint32(T), 1}, [3]uint32{uint32(min(d, 128)), 1, 1}, uint32(4*nsplit),
			o, pacc, pml, int32(p.Heads), int32(nsplit))
	})
}

func (b *Backend) Route(ids, weights, logits, bias *kernels.Tensor, p kernels.RouterParams) error {
	var ta tensorArgs
	lg := ta.ptr(logits, kernels.F32, "router logits")
	bp := ta.ptr(bias, kernels.F32, "correction bias")
	ip := ta.ptr(ids, kernels.I32, "expert ids")
	wp := ta.ptr(weights, kernels.F32, "expert weights")
	if ta.err != nil {
		return ta.err
	}
	e, k := p.Experts, p.TopK
	if logits.Cols() != e || bias.Elements() != e || p.Groups <= 0 || e%p.Groups != 0 || k > e || k <= 0 {
		return fmt.Errorf("cuda: route: logits %v, bias %d, params %+v", logits.Shape, bias.Elements(), p)
	}
	if e > 512 || p.Groups > 64 || k > 32 {
		return fmt.Errorf("cuda: route supports up to 512 experts in 64 groups and top-32, got %d in %d, top-%d", e, p.Groups, k)
	}
	T := logits.Rows()
	if ids.Elements() != T*k || weights.Elements() != T*k {
		return fmt.Errorf("cuda: route: outputs hold %d/%d entries, want %d", ids.Elements(), weights.Elements(), T*k)
	}
	norm := int32(0)
	if p.NormTopK {
		norm = 1
	}
	err := b.op(func() error {
		return b.launch("ops", "route", [3]uint32{uint32((T + 3) / 4), 1, 1}, b128, 0,
			ip, wp, lg, bp, int32(T), int32(e), int32(k), int32(p.Groups), int32(p.TopKGroups), norm, p.Scale)
	})
	if err == nil && b.RouteObserver != nil {
		v, err := b.DownloadI32(ids)
		if err != nil {
			return err
		}
		b.RouteObserver(v, e)
	}
	return err
}

// argmaxMaxRows bounds the rows of one split argmax (its arrival counters
// sit after the GEMVs' in sgCounters); wider calls take one block per row.
const argmaxMaxRows = 4096

// Argmax writes the index of each row's largest logit into out (I32 [rows])
// without leaving the device (graph-capturable greedy sampling).
func (b *Backend) Argmax(out, logits *kernels.Tensor) error {
	var ta tensorArgs
	op := ta.ptr(out, kernels.I32, "argmax output")
	lp := ta.ptr(logits, kernels.F32, "logits")
	if ta.err != nil {
		return ta.err
	}
	if out.Elements() != logits.Rows() {
		return fmt.Errorf("cuda: argmax: %d outputs for %d rows", out.Elements(), logits.Rows())
	}
	R, V := logits.Rows(), logits.Cols()
	return b.op(func() error {
		if R > argmaxMaxRows {
			return b.launch("ops", "argmax_rows", rows(R), b1024, 0, op, lp, int32(V))
		}
		// Chunks of 4096 logits: 37 blocks per GLM-4.5 row.
		const chunk = 4096
		nc := (V + chunk - 1) / chunk
		part, err := b.pool.alloc(align256(4*R*nc) * 2)
		if err != nil {
			return err
		}
		defer b.pool.put(part)
		return b.launch("ops", "argmax_split", [3]uint32{uint32(nc), uint32(R), 1}, b256, 0, op, lp, int32(V), int32(chunk),
			part.ptr, part.ptr+align256(4*R*nc), b.sgCounters.ptr+4*sgMaxCounters)
	})
}

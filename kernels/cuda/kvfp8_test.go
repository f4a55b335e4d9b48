package cuda

import (
	"fmt"
	"math"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
)

// fp8Bytes encodes v as e4m3 (the CPU twin's rounding).
func fp8Bytes(v []float32, scale float32) []byte {
	b := make([]byte, len(v))
	for i, x := range v {
		b[i] = kernels.F32ToE4M3(x / scale)
	}
	return b
}

// fp8Cache is one layer's e4m3 KV cache on both backends, holding hist.
func fp8Cache(p *pairT, hist [2][]byte, bs, slots, kv, d int, ks, vs float32) (c, g *kernels.KVCache) {
	k := p.upload(kernels.F8E4M3, hist[0], slots, kv, d)
	v := p.upload(kernels.F8E4M3, hist[1], slots, kv, d)
	c = &kernels.KVCache{K: k.c, V: v.c, BlockSize: bs, KVHeads: kv, HeadDim: d, KScale: ks, VScale: vs}
	g = &kernels.KVCache{K: k.g, V: v.g, BlockSize: bs, KVHeads: kv, HeadDim: d, KScale: ks, VScale: vs}
	return c, g
}

// The GPU's e4m3 KV write (qk_norm_rope_kv_fp8) stores the same bytes as
// the CPU twin's: every e4m3 value, the midpoints between neighbours (ties
// to even) and a hair either side, subnormals, and values past ±448·scale
// (saturated), for K (no rotary, no norm: written as given) and V.
func TestFP8KVWriteTwin(t *testing.T) {
	p := newPair(t)
	const kvh, d, bs, nblocks = 2, 64, 16, 8
	var vals []float32
	for b := range 0x7f { // 0x7f is NaN
		lo := kernels.E4M3ToF32(uint8(b))
		hi := float32(480) // past the largest value: saturates
		if b < 0x7e {
			hi = kernels.E4M3ToF32(uint8(b + 1))
		}
		mid := (lo + hi) / 2
		vals = append(vals, lo, -lo, mid, -mid, math.Nextafter32(mid, 0), math.Nextafter32(mid, 1e9))
	}
	vals = append(vals, 1e9, -1e9, float32(math.Inf(1)), float32(math.Inf(-1)), 1e-30, -1e-30)
	for _, sc := range [][2]float32{{1, 1}, {0.37, 2.5}} {
		t.Run(fmt.Sprintf("k%g_v%g", sc[0], sc[1]), func(t *testing.T) {
			p := p.sub(t)
			T := (len(vals) + kvh*d - 1) / (kvh * d)
			newTok := []int{T/2 + 1, T - T/2 - 1}
			batch := attentionBatch(p, newTok, []int{3, 30}, bs, nblocks)
			n := T * kvh * d
			kx, vx := make([]float32, n), make([]float32, n)
			for i := range kx {
				kx[i] = vals[i%len(vals)] * sc[0]
				vx[i] = vals[(i+7)%len(vals)] * sc[1]
			}
			zeros := [2][]byte{make([]byte, nblocks*bs*kvh*d), make([]byte, nblocks*bs*kvh*d)}
			ccache, gcache := fp8Cache(p, zeros, bs, nblocks*bs, kvh, d, sc[0], sc[1])
			q, k, v := p.f32(1, T, kvh*d), p.upload(kernels.F32, f32Bytes(kx), T, kvh*d), p.upload(kernels.F32, f32Bytes(vx), T, kvh*d)
			cm, err := p.cpu.UploadBatch(batch)
			must(t, "batch", err)
			gm, err := p.gpu.UploadBatch(batch)
			must(t, "batch", err)
			rope := kernels.RopeParams{Heads: kvh, HeadDim: d, RotaryDim: 0, Theta: 1e4}
			must(t, "qk-norm-rope-kv",
				p.cpu.QKNormRopeKV(q.c, k.c, v.c, nil, nil, 1e-5, rope, kvh, ccache, cm),
				p.gpu.QKNormRopeKV(q.g, k.g, v.g, nil, nil, 1e-5, rope, kvh, gcache, gm))
			for _, c := range []struct {
				what string
				c, g *kernels.Tensor
			}{{"k", ccache.K, gcache.K}, {"v", ccache.V, gcache.V}} {
				got, err := p.gpu.DownloadBytes(c.g)
				must(t, "download", err)
				want := c.c.Impl.([]byte)
				for i := range want {
					if got[i] != want[i] {
						slot, e := i/(kvh*d), i%(kvh*d)
						t.Fatalf("%s cache slot %d element %d: GPU %#02x, CPU %#02x", c.what, slot, e, got[i], want[i])
					}
				}
			}
		})
	}
}

// Attention over an e4m3 cache on the GPU (attention_mma for decode and
// prefill tiles; attention_split with more than 16 q heads per kv head, or
// with NoTensorCoreAttention) against the CPU twin over the same bytes:
// the step's k/v written by both backends, then decode, prefill and
// chunked-prefill batches on awkward sizes, with K/V scales other than 1.
func TestFP8AttentionTwin(t *testing.T) {
	forModes(t, []backendMode{{"mma", Options{}}, {"cuda-core", Options{NoTensorCoreAttention: true}}}, fp8AttentionTwin)
}

func fp8AttentionTwin(t *testing.T, p *pairT) {
	type acase struct {
		heads, kv, d, rot int
		qknorm            bool
		ks, vs            float32
		newTok, cached    []int
		subnormal         bool // history of e4m3 subnormals only
	}
	for _, ac := range []acase{
		{96, 8, 128, 64, false, 1, 1, []int{1, 1, 5}, []int{4095, 17, 300}, false}, // GLM-4.5's heads: 12 per kv head
		{96, 8, 128, 64, true, 0.05, 0.3, []int{1, 1, 1, 1}, []int{2000, 0, 129, 64}, false},
		{4, 2, 32, 16, false, 2, 0.5, []int{7, 1, 1}, []int{0, 40, 3}, false},
		{12, 4, 64, 32, true, 1, 1, []int{1, 1, 1}, []int{700, 5, 129}, false},
		{24, 2, 128, 64, true, 0.7, 1.3, []int{33, 1}, []int{0, 1500}, false},    // prefill tiles
		{12, 4, 64, 32, true, 1, 1, []int{20, 40, 3}, []int{30, 0, 7}, false},    // chunked prefill
		{8, 2, 96, 32, false, 1, 1, []int{17, 1}, []int{50, 333}, false},         // head dim of three 32s
		{40, 2, 64, 32, false, 1, 1, []int{2, 1}, []int{90, 1000}, false},        // 20 per kv head: attention_split
		{96, 8, 128, 64, false, 1.0 / 64, 64, []int{1, 3}, []int{500, 40}, true}, // subnormals must not flush
	} {
		name := fmt.Sprintf("h%d_kv%d_d%d_k%g_v%g", ac.heads, ac.kv, ac.d, ac.ks, ac.vs)
		if ac.subnormal {
			name += "_subnormal"
		}
		t.Run(name, func(t *testing.T) {
			p := p.sub(t)
			const bs, nblocks = 16, 400
			batch := attentionBatch(p, ac.newTok, ac.cached, bs, nblocks)
			T := batch.Tokens()
			slots := nblocks * bs
			var hist [2][]byte
			for i := range hist {
				hist[i] = make([]byte, slots*ac.kv*ac.d)
				for j := range hist[i] {
					b := byte(p.rng.IntN(256))
					if ac.subnormal {
						b &= 0x87
					} else if (b>>3)&0xf > 8 {
						// Keys and values of magnitude up to ~4, as a model's
						// are: with the whole e4m3 range (±448) the logits
						// reach hundreds and the tensor-core kernels' bf16
						// rounding of q (2^-9 relative) alone moves the
						// softmax by several percent.
						b = b&0x87 | byte(p.rng.IntN(9))<<3
					}
					if b&0x7f == 0x7f { // NaN: never written
						b ^= 1
					}
					hist[i][j] = b
				}
			}
			ccache, gcache := fp8Cache(p, hist, bs, slots, ac.kv, ac.d, ac.ks, ac.vs)
			q := p.f32(1, T, ac.heads*ac.d)
			k, v := p.f32(ac.ks, T, ac.kv*ac.d), p.f32(ac.vs, T, ac.kv*ac.d)
			if ac.subnormal {
				k, v = p.f32(ac.ks/100, T, ac.kv*ac.d), p.f32(ac.vs/100, T, ac.kv*ac.d)
			}
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
			// The caches hold the same bytes, but for this step's k values
			// that the backends' rotary (equal to ~1e-7) put on either side
			// of an e4m3 rounding boundary: one step of 2^-3 relative, rare.
			gk, err := p.gpu.DownloadBytes(gcache.K)
			must(t, "download", err)
			differ := 0
			for i, b := range ccache.K.Impl.([]byte) {
				if gk[i] != b {
					differ++
				}
			}
			if differ > 1+T*ac.kv*ac.d/10000 {
				t.Fatalf("k caches differ in %d bytes", differ)
			}
			out := p.poisoned(T, ac.heads*ac.d)
			ap := kernels.AttentionParams{Heads: ac.heads, KVHeads: ac.kv, HeadDim: ac.d, Scale: float32(1 / math.Sqrt(float64(ac.d)))}
			must(t, "attention", p.cpu.Attention(out.c, q.c, ccache, ap, cm), p.gpu.Attention(out.g, q.g, gcache, ap, gm))
			// As with bf16 caches: the tensor-core kernels round q and the
			// softmax weights to bf16 (the e4m3 values convert exactly).
			p.check("attention", out, 1e-2)
		})
	}
}

// Prefill over an e4m3 cache through attention_flash (its e4m3 ring and
// bf16 stage) against the CPU twin, with the shapes of
// TestFlashAttentionTwin: GLM-4.5 Air's group over a 1000-token prompt, a
// chunked continuation beside a decode token, idle warps, several sequences
// per block, a head dim of three 32s, blocks of 32 and, with 12 positions
// per block, the fall-back to attention_mma's prefill tiles. The per-q-head
// kernel (NoFlashAttention) must agree too.
func TestFP8FlashAttentionTwin(t *testing.T) { forModes(t, prefillModes, fp8PrefillTwin) }

func fp8PrefillTwin(t *testing.T, p *pairT) {
	for _, fc := range []prefillCase{
		{"air_prompt1000", 24, 2, 128, 16, 4, []int{1000}, []int{0}},
		{"air_chunked", 24, 2, 128, 16, 4, []int{300, 37, 1}, []int{1000, 0, 77}},
		{"g2_d64_4seqs", 4, 2, 64, 16, 1, []int{70, 33, 16, 5}, []int{0, 20, 200, 9}},
		{"g3_d64_bs32", 9, 3, 64, 32, 2, []int{50, 45}, []int{3, 100}},
		{"g4_d96", 8, 2, 96, 16, 2, []int{90, 20}, []int{0, 33}},
		{"g12_d128_bs12", 12, 1, 128, 12, 1, []int{40}, []int{30}}, // not 2^k positions per block: attention_mma
	} {
		t.Run(fc.name, func(t *testing.T) {
			p := p.sub(t)
			r := fc.run(t, p, func(slots int) (c, g *kernels.KVCache) {
				const ks, vs = 0.02, 0.01
				hist := [2][]byte{fp8Bytes(p.randF32(slots*fc.kv*fc.d, 1), ks), fp8Bytes(p.randF32(slots*fc.kv*fc.d, 1), vs)}
				return fp8Cache(p, hist, fc.bs, slots, fc.kv, fc.d, ks, vs)
			})
			p.check("prefill attention (e4m3)", r.out, 1e-2)
		})
	}
}

// BenchmarkDecodeAttentionAir times decode attention (one new token per
// sequence) at GLM-4.5 Air's shapes (96 q heads, 8 kv heads, head dim 128,
// blocks of 16) for a bf16 and an e4m3 cache: batch sequences at context
// ctx, in µs per layer and GB/s of K/V read (the kernel's floor). The e4m3
// cache reads half the bytes, so at large batch × context it should take
// about half the time. Run with -test.bench DecodeAttentionAir
// -test.benchtime 50x.
func BenchmarkDecodeAttentionAir(b *testing.B) {
	g := gpu(b, Options{})
	for _, dt := range []kernels.DType{kernels.BF16, kernels.F8E4M3} {
		for _, sh := range [][2]int{{1, 8192}, {16, 8192}, {64, 4096}, {128, 2048}} {
			batch, ctx := sh[0], sh[1]
			b.Run(fmt.Sprintf("%v/b%d_ctx%d", dt, batch, ctx), func(b *testing.B) {
				m := airBatch(batch, ctx, true)
				per := airAttention(b, g, dt, m, batch*ctx)
				b.ReportMetric(per*1e6, "µs/layer")
				b.ReportMetric(float64(2*batch*ctx*airKV*airD*dt.Size())/per/1e9, "GB/s")
			})
		}
	}
}

// BenchmarkPrefillAttentionAir times causal prefill attention over one
// 8192-token prompt at GLM-4.5 Air's shapes (attention_flash) for a bf16
// and an e4m3 cache, in ms per layer and TFLOP/s (as
// BenchmarkFlashAttentionAir). Run with -test.bench PrefillAttentionAir
// -test.benchtime 20x.
func BenchmarkPrefillAttentionAir(b *testing.B) {
	const T = 8192
	g := gpu(b, Options{})
	for _, dt := range []kernels.DType{kernels.BF16, kernels.F8E4M3} {
		b.Run(dt.String(), func(b *testing.B) {
			per := airAttention(b, g, dt, airBatch(1, T, false), T)
			b.ReportMetric(per*1e3, "ms/layer")
			b.ReportMetric(4*airHeads*airD*float64(T)*T/2/per/1e12, "TFLOP/s")
		})
	}
}

// GLM-4.5 Air's attention: 96 q heads over 8 kv heads of 128, blocks of 16.
const airHeads, airKV, airD, airBS = 96, 8, 128, 16

// airBatch is batch sequences of ctx tokens with their blocks out of order
// (as after some churn): the last token of each (decode) or all of one (prefill).
func airBatch(batch, ctx int, decode bool) *kernels.Batch {
	perSeq := ctx / airBS
	m := &kernels.Batch{}
	for s := range batch {
		table := make([]int32, perSeq)
		for i := range table {
			table[i] = int32(s*perSeq + (perSeq - 1 - i))
		}
		first := 0
		if decode {
			first = ctx - 1
		}
		for pos := first; pos < ctx; pos++ {
			m.Positions = append(m.Positions, int32(pos))
			m.SeqIndex = append(m.SeqIndex, int32(s))
			m.Slots = append(m.Slots, table[pos/airBS]*airBS+int32(pos%airBS))
		}
		m.BlockTables = append(m.BlockTables, table)
		m.ContextLens = append(m.ContextLens, int32(ctx))
	}
	return m
}

// airAttention is the mean time (s) of one Attention call of
// batch m over a random cache of slots positions in dt, on GPU events.
func airAttention(b *testing.B, g *Backend, dt kernels.DType, m *kernels.Batch, slots int) float64 {
	must2 := func(err error) {
		if err != nil {
			b.Fatal(err)
		}
	}
	var owned []*kernels.Tensor
	defer func() {
		for _, x := range owned {
			g.Free(x)
		}
	}()
	tensor := func(dt kernels.DType, seed uint64, shape ...int) *kernels.Tensor {
		x, err := g.NewTensor(dt, shape...)
		must2(err)
		owned = append(owned, x)
		must2(g.Fill(x, seed, 1))
		return x
	}
	T := m.Tokens()
	q, out := tensor(kernels.F32, 1, T, airHeads*airD), tensor(kernels.F32, 2, T, airHeads*airD)
	cache := &kernels.KVCache{K: tensor(dt, 3, slots, airKV, airD), V: tensor(dt, 4, slots, airKV, airD),
		BlockSize: airBS, KVHeads: airKV, HeadDim: airD}
	if dt == kernels.F8E4M3 { // Fill's e4m3 bytes reach ±120: keep the softmax in range
		cache.KScale, cache.VScale = 1.0/64, 1.0/64
	}
	meta, err := g.UploadBatch(m)
	must2(err)
	ap := kernels.AttentionParams{Heads: airHeads, KVHeads: airKV, HeadDim: airD, Scale: float32(1 / math.Sqrt(airD))}
	must2(g.Attention(out, q, cache, ap, meta)) // compile, load, warm up
	tm, err := g.NewTimer()
	must2(err)
	defer tm.Close()
	b.ResetTimer()
	must2(tm.Start())
	for range b.N {
		must2(g.Attention(out, q, cache, ap, meta))
	}
	must2(tm.Stop())
	sec, err := tm.Seconds()
	must2(err)
	return sec / float64(b.N)
}

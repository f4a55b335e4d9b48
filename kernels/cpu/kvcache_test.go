package cpu

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
)

// fp8KVStep writes one batch's k/v through QKNormRopeKV into an F32 cache
// and an F8E4M3 cache with the given scales, then runs attention over both.
type fp8KVStep struct {
	f32, fp8       *kernels.KVCache
	outF32, outFP8 []float32
	q              []float32 // this step's rotated q
	batch          *kernels.Batch
	ap             kernels.AttentionParams
}

func runFP8KVStep(t *testing.T, b *Backend, r *rand.Rand, ks, vs, vmag float32) fp8KVStep {
	t.Helper()
	const H, KVH, D, bs, blocks = 6, 2, 16, 4, 12
	lens := []int{1, 9, 14}
	batch := &kernels.Batch{}
	perm := r.Perm(blocks)
	next := 0
	for s, n := range lens {
		var table []int32
		for range (n + bs - 1) / bs {
			table = append(table, int32(perm[next]))
			next++
		}
		for p := range n {
			batch.Positions = append(batch.Positions, int32(p))
			batch.SeqIndex = append(batch.SeqIndex, int32(s))
			batch.Slots = append(batch.Slots, table[p/bs]*bs+int32(p%bs))
		}
		batch.BlockTables = append(batch.BlockTables, table)
		batch.ContextLens = append(batch.ContextLens, int32(n))
	}
	if err := batch.Validate(bs); err != nil {
		t.Fatal(err)
	}
	T := batch.Tokens()
	meta, _ := b.UploadBatch(batch)
	newCache := func(dt kernels.DType) *kernels.KVCache {
		k, err := b.NewTensor(dt, blocks*bs, KVH, D)
		if err != nil {
			t.Fatal(err)
		}
		v, _ := b.NewTensor(dt, blocks*bs, KVH, D)
		return &kernels.KVCache{K: k, V: v, BlockSize: bs, KVHeads: KVH, HeadDim: D}
	}
	ap := kernels.AttentionParams{Heads: H, KVHeads: KVH, HeadDim: D, Scale: float32(1 / math.Sqrt(D))}
	st := fp8KVStep{f32: newCache(kernels.F32), fp8: newCache(kernels.F8E4M3), batch: batch, ap: ap}
	st.fp8.KScale, st.fp8.VScale = ks, vs
	rope := kernels.RopeParams{Heads: H, HeadDim: D, RotaryDim: 8, Theta: 1e4}
	q0, k0, v0 := randVec(r, T*H*D), randVec(r, T*KVH*D), randVec(r, T*KVH*D)
	for i := range v0 {
		v0[i] *= vmag
	}
	for _, c := range []struct {
		cache *kernels.KVCache
		out   *[]float32
	}{{st.f32, &st.outF32}, {st.fp8, &st.outFP8}} {
		q, k, v := tensor(t, b, q0, T, H*D), tensor(t, b, k0, T, KVH*D), tensor(t, b, v0, T, KVH*D)
		if err := b.QKNormRopeKV(q, k, v, nil, nil, 1e-5, rope, KVH, c.cache, meta); err != nil {
			t.Fatal(err)
		}
		out, _ := b.NewTensor(kernels.F32, T, H*D)
		if err := b.Attention(out, q, c.cache, ap, meta); err != nil {
			t.Fatal(err)
		}
		*c.out, _ = b.Download(out)
		st.q = q.Impl.([]float32)
	}
	return st
}

// An fp8 KV cache holds e4m3(x / scale) of what an f32 cache holds, bit for
// bit, and attention over it equals attention over the dequantized values
// (e4m3 · scale) exactly; against the f32 cache it stays within e4m3's
// rounding.
func TestFP8KVCache(t *testing.T) {
	b := New(2)
	for _, sc := range []struct{ k, v, vmag float32 }{
		{1, 1, 1}, {0.3, 3.7, 1}, {0, 0, 1}, // 0: unset, 1
		{1, 0.01, 1000}, // v / scale far past 448: saturates
	} {
		t.Run(fmt.Sprintf("k%g_v%g", sc.k, sc.v), func(t *testing.T) {
			r := rand.New(rand.NewPCG(5, 6))
			st := runFP8KVStep(t, b, r, sc.k, sc.v, sc.vmag)
			ks, vs := st.fp8.Scales()
			kq, vq := st.fp8.K.Impl.([]byte), st.fp8.V.Impl.([]byte)
			kf, vf := st.f32.K.Impl.([]float32), st.f32.V.Impl.([]float32)
			stride := st.fp8.KVHeads * st.fp8.HeadDim
			for _, slot := range st.batch.Slots {
				for i := int(slot) * stride; i < int(slot+1)*stride; i++ {
					if kq[i] != kernels.F32ToE4M3(kf[i]/ks) || vq[i] != kernels.F32ToE4M3(vf[i]/vs) {
						t.Fatalf("slot %d element %d: cache %#x/%#x, want e4m3 of %g/%g", slot, i, kq[i], vq[i], kf[i]/ks, vf[i]/vs)
					}
				}
			}
			// The same attention over an f32 cache of the dequantized values.
			for i := range kf {
				kf[i] = kernels.E4M3ToF32(kq[i]) * ks
				vf[i] = kernels.E4M3ToF32(vq[i]) * vs
			}
			meta, _ := b.UploadBatch(st.batch)
			T := len(st.batch.Positions)
			HD := len(st.q) / T
			out, _ := b.NewTensor(kernels.F32, T, HD)
			if err := b.Attention(out, tensor(t, b, st.q, T, HD), st.f32, st.ap, meta); err != nil {
				t.Fatal(err)
			}
			deq, _ := b.Download(out)
			for i, x := range deq {
				if x != st.outFP8[i] {
					t.Fatalf("output %d: %g over the fp8 cache, %g over its dequantized values", i, st.outFP8[i], x)
				}
			}
			if sc.vmag*sc.k/sc.v > 448 {
				sat := 0
				for _, q := range vq {
					if q&0x7f == 0x7e {
						sat++
					}
				}
				if sat == 0 {
					t.Fatal("no v value saturated at ±448")
				}
				return
			}
			var num, den float64
			for i, x := range st.outF32 {
				d := float64(st.outFP8[i] - x)
				num += d * d
				den += float64(x) * float64(x)
			}
			rel := math.Sqrt(num / den)
			// e4m3 keeps 3 mantissa bits: a relative rounding error of at
			// most 2^-4 per element, about 2^-4/√3 ≈ 3.6% RMS; the output
			// averages such errors over the context and head dims.
			if rel > 1.0/16 || rel == 0 {
				t.Fatalf("fp8 cache attention differs from f32 by %.3g RMS (relative), want (0, 1/16]", rel)
			}
			t.Logf("fp8 vs f32 cache: relative RMS difference %.4f", rel)
		})
	}
}

// A KV cache of another dtype, or an e4m3 one with a scale that is not a
// finite positive number, is a clear error rather than a panic or garbage.
func TestKVCacheRejects(t *testing.T) {
	b := New(1)
	batch := &kernels.Batch{Positions: []int32{0}, SeqIndex: []int32{0}, Slots: []int32{0},
		BlockTables: [][]int32{{0}}, ContextLens: []int32{1}}
	meta, _ := b.UploadBatch(batch)
	for _, c := range []struct {
		name   string
		dt     kernels.DType
		ks, vs float32
	}{
		{"i32", kernels.I32, 0, 0},
		{"negative scale", kernels.F8E4M3, -1, 1},
		{"nan scale", kernels.F8E4M3, 1, float32(math.NaN())},
		{"inf scale", kernels.F8E4M3, float32(math.Inf(1)), 1},
		{"mixed", kernels.F32, 0, 0}, // V below is e4m3
	} {
		t.Run(c.name, func(t *testing.T) {
			k, _ := b.NewTensor(c.dt, 4, 1, 8)
			v, _ := b.NewTensor(c.dt, 4, 1, 8)
			if c.name == "mixed" {
				v, _ = b.NewTensor(kernels.F8E4M3, 4, 1, 8)
			}
			cache := &kernels.KVCache{K: k, V: v, BlockSize: 4, KVHeads: 1, HeadDim: 8, KScale: c.ks, VScale: c.vs}
			q, kx, vx := tensor(t, b, make([]float32, 8), 1, 8), tensor(t, b, make([]float32, 8), 1, 8), tensor(t, b, make([]float32, 8), 1, 8)
			rope := kernels.RopeParams{Heads: 1, HeadDim: 8, RotaryDim: 8, Theta: 1e4}
			if err := b.QKNormRopeKV(q, kx, vx, nil, nil, 1e-5, rope, 1, cache, meta); err == nil {
				t.Error("kv write: no error")
			}
			out, _ := b.NewTensor(kernels.F32, 1, 8)
			if err := b.Attention(out, q, cache, kernels.AttentionParams{Heads: 1, KVHeads: 1, HeadDim: 8, Scale: 1}, meta); err == nil {
				t.Error("attention: no error")
			}
		})
	}
}

package cpu

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
)

func f32bytes(v []float32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return b
}

func randVec(r *rand.Rand, n int) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = float32(r.NormFloat64())
	}
	return v
}

func tensor(t *testing.T, b *Backend, v []float32, shape ...int) *kernels.Tensor {
	t.Helper()
	x, err := b.NewTensor(kernels.F32, shape...)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Upload(x, f32bytes(v)); err != nil {
		t.Fatal(err)
	}
	return x
}

// Linear against a float64 reference, for every weight storage, on sizes
// that are not multiples of the register tiles or scale blocks.
func TestLinearAllStorages(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	b := New(3)
	for _, sz := range [][3]int{{1, 5, 7}, {2, 33, 130}, {3, 17, 64}, {67, 9, 131}, {130, 70, 3}} {
		T, N, K := sz[0], sz[1], sz[2]
		x := randVec(r, T*K)
		wf := randVec(r, N*K)
		bias := randVec(r, N)
		// The reference uses the values each storage actually holds.
		type storage struct {
			name string
			w    *kernels.Tensor
			vals []float32
		}
		var cases []storage
		cases = append(cases, storage{"f32", tensor(t, b, wf, N, K), wf})
		bf := make([]byte, 2*N*K)
		bfv := make([]float32, N*K)
		for i, v := range wf {
			h := uint16(math.Float32bits(v) >> 16) // truncation is fine: the reference uses the stored value
			binary.LittleEndian.PutUint16(bf[2*i:], h)
			bfv[i] = math.Float32frombits(uint32(h) << 16)
		}
		wb, _ := b.UploadWeight(kernels.BF16, []int{N, K}, bf)
		cases = append(cases, storage{"bf16", wb, bfv})
		q := make([]byte, N*K)
		for i := range q {
			q[i] = byte(r.IntN(256))
			if q[i]&0x7f == 0x7f {
				q[i] = 0 // no NaNs
			}
		}
		pc := randVec(r, N)
		for i := range pc {
			pc[i] = float32(math.Abs(float64(pc[i]))) + 0.01
		}
		wq, _ := b.UploadWeight(kernels.F8E4M3, []int{N, K}, q)
		wq.Scale, wq.ScaleLayout = tensor(t, b, pc, N), kernels.ScalePerChannel
		pcv := make([]float32, N*K)
		for i := range pcv {
			pcv[i] = e4m3[q[i]] * pc[i/K]
		}
		cases = append(cases, storage{"fp8-channel", wq, pcv})
		const B0, B1 = 4, 8
		sr, sc := (N+B0-1)/B0, (K+B1-1)/B1
		bs := randVec(r, sr*sc)
		for i := range bs {
			bs[i] = float32(math.Abs(float64(bs[i]))) + 0.01
		}
		wqb, _ := b.UploadWeight(kernels.F8E4M3, []int{N, K}, q)
		wqb.Scale, wqb.ScaleLayout, wqb.ScaleBlock = tensor(t, b, bs, sr, sc), kernels.ScaleBlock, [2]int{B0, B1}
		bv := make([]float32, N*K)
		for i := range bv {
			bv[i] = e4m3[q[i]] * bs[(i/K/B0)*sc+(i%K)/B1]
		}
		cases = append(cases, storage{"fp8-block", wqb, bv})
		for _, c := range cases {
			xt := tensor(t, b, x, T, K)
			out, _ := b.NewTensor(kernels.F32, T, N)
			if err := b.Linear(out, xt, c.w, tensor(t, b, bias, N)); err != nil {
				t.Fatal(err)
			}
			got, _ := b.Download(out)
			for tt := 0; tt < T; tt++ {
				for n := 0; n < N; n++ {
					var want, mag float64
					for k := 0; k < K; k++ {
						p := float64(x[tt*K+k]) * float64(c.vals[n*K+k])
						want += p
						mag += math.Abs(p)
					}
					want += float64(bias[n])
					if d := math.Abs(float64(got[tt*N+n]) - want); d > 1e-5*(mag+1) {
						t.Fatalf("%s T=%d N=%d K=%d: out[%d,%d] = %g, want %g", c.name, T, N, K, tt, n, got[tt*N+n], want)
					}
				}
			}
		}
	}
}

// A token's result must not depend on the batch it is computed in.
func TestLinearBatchInvariant(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	b := New(2)
	const N, K = 37, 101
	w := tensor(t, b, randVec(r, N*K), N, K)
	x := randVec(r, 9*K)
	all, _ := b.NewTensor(kernels.F32, 9, N)
	b.Linear(all, tensor(t, b, x, 9, K), w, nil)
	batch, _ := b.Download(all)
	for tt := 0; tt < 9; tt++ {
		one, _ := b.NewTensor(kernels.F32, 1, N)
		b.Linear(one, tensor(t, b, x[tt*K:(tt+1)*K], 1, K), w, nil)
		single, _ := b.Download(one)
		for n := range single {
			if single[n] != batch[tt*N+n] {
				t.Fatalf("token %d output %d: %g alone, %g in a batch of 9", tt, n, single[n], batch[tt*N+n])
			}
		}
	}
}

func TestRouteGroupLimited(t *testing.T) {
	b := New(1)
	// 8 experts in 4 groups of 2; keep 2 groups, choose 2 experts.
	// Biased scores favour expert 0 alone, but group {6,7} has the best pair.
	logit := func(p float64) float32 { return float32(math.Log(p / (1 - p))) }
	probs := []float64{0.95, 0.05, 0.5, 0.5, 0.3, 0.3, 0.8, 0.8}
	lg := make([]float32, 8)
	for i, p := range probs {
		lg[i] = logit(p)
	}
	bias := []float32{0, 0, 0.01, 0, 0, 0, 0, 0}
	ids, _ := b.NewTensor(kernels.I32, 1, 2)
	w, _ := b.NewTensor(kernels.F32, 1, 2)
	p := kernels.RouterParams{Experts: 8, TopK: 2, Groups: 4, TopKGroups: 2, NormTopK: true, Scale: 2.5}
	if err := b.Route(ids, w, tensor(t, b, lg, 1, 8), tensor(t, b, bias, 8), p); err != nil {
		t.Fatal(err)
	}
	gi, _ := b.DownloadI32(ids)
	gw, _ := b.Download(w)
	// Group sums: {0,1}=1.0, {2,3}=1.01, {4,5}=0.6, {6,7}=1.6 → keep {6,7} and {2,3}.
	if gi[0] != 6 || gi[1] != 7 {
		t.Fatalf("chose %v, want [6 7]", gi)
	}
	if math.Abs(float64(gw[0])-1.25) > 1e-5 || math.Abs(float64(gw[1])-1.25) > 1e-5 {
		t.Errorf("weights %v, want 1.25 each (0.8/1.6·2.5)", gw)
	}
	// Without group limits expert 0 (0.95) wins first place.
	p.Groups, p.TopKGroups = 1, 1
	b.Route(ids, w, tensor(t, b, lg, 1, 8), tensor(t, b, bias, 8), p)
	gi, _ = b.DownloadI32(ids)
	if gi[0] != 0 {
		t.Errorf("ungrouped top-1 is %d, want 0", gi[0])
	}
}

func TestSampleDistribution(t *testing.T) {
	logits := []float32{2, 1, 0.5, -1, 3}
	r := rand.New(rand.NewPCG(5, 6))
	counts := make([]int, len(logits))
	const n = 200000
	for i := 0; i < n; i++ {
		counts[SampleRow(logits, kernels.SampleParams{Temperature: 0.7, U: r.Float32()})]++
	}
	var z float64
	for _, l := range logits {
		z += math.Exp(float64(l) / 0.7)
	}
	for i, l := range logits {
		p := math.Exp(float64(l)/0.7) / z
		if got := float64(counts[i]) / n; math.Abs(got-p) > 0.005 {
			t.Errorf("token %d sampled with frequency %.4f, softmax says %.4f", i, got, p)
		}
	}
	// top-k 2 keeps tokens 4 and 0 only; top-p 0.5 keeps token 4 only.
	for i := 0; i < 1000; i++ {
		u := r.Float32()
		if s := SampleRow(logits, kernels.SampleParams{Temperature: 1, TopK: 2, U: u}); s != 4 && s != 0 {
			t.Fatalf("top-k 2 sampled %d", s)
		}
		if s := SampleRow(logits, kernels.SampleParams{Temperature: 1, TopP: 0.5, U: u}); s != 4 {
			t.Fatalf("top-p 0.5 sampled %d", s)
		}
	}
	b := New(1)
	lt := tensor(t, b, logits, 1, 5)
	got, _ := b.Sample(lt, []kernels.SampleParams{{Ban: []int32{4}}})
	if got[0] != 0 {
		t.Errorf("argmax with 4 banned = %d, want 0", got[0])
	}
}

// Paged attention against a direct causal softmax over contiguous K/V.
func TestAttentionPagedGQA(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	b := New(2)
	const H, KVH, D, bs = 6, 2, 8, 4
	lens := []int{1, 9}
	var batch kernels.Batch
	k, _ := b.NewTensor(kernels.F32, 16*bs, KVH, D)
	v, _ := b.NewTensor(kernels.F32, 16*bs, KVH, D)
	kc, vc := k.Impl.([]float32), v.Impl.([]float32)
	type seq struct{ k, v [][]float32 }
	seqs := make([]seq, len(lens))
	blocks := [][]int32{{7}, {3, 12, 0}}
	for s, n := range lens {
		for p := 0; p < n; p++ {
			slot := int(blocks[s][p/bs])*bs + p%bs
			kv, vv := randVec(r, KVH*D), randVec(r, KVH*D)
			copy(kc[slot*KVH*D:], kv)
			copy(vc[slot*KVH*D:], vv)
			seqs[s].k = append(seqs[s].k, kv)
			seqs[s].v = append(seqs[s].v, vv)
			batch.Positions = append(batch.Positions, int32(p))
			batch.SeqIndex = append(batch.SeqIndex, int32(s))
			batch.Slots = append(batch.Slots, int32(slot))
		}
		batch.BlockTables = append(batch.BlockTables, blocks[s])
		batch.ContextLens = append(batch.ContextLens, int32(n))
	}
	if err := batch.Validate(bs); err != nil {
		t.Fatal(err)
	}
	T := batch.Tokens()
	q := randVec(r, T*H*D)
	meta, _ := b.UploadBatch(&batch)
	out, _ := b.NewTensor(kernels.F32, T, H*D)
	cache := &kernels.KVCache{K: k, V: v, BlockSize: bs, KVHeads: KVH, HeadDim: D}
	scale := float32(1 / math.Sqrt(D))
	if err := b.Attention(out, tensor(t, b, q, T, H*D), cache, kernels.AttentionParams{Heads: H, KVHeads: KVH, HeadDim: D, Scale: scale}, meta); err != nil {
		t.Fatal(err)
	}
	got, _ := b.Download(out)
	for tt := 0; tt < T; tt++ {
		s, pos := batch.SeqIndex[tt], int(batch.Positions[tt])
		for h := 0; h < H; h++ {
			g := h / (H / KVH)
			var sc []float64
			var m float64 = math.Inf(-1)
			for p := 0; p <= pos; p++ {
				var d float64
				for i := 0; i < D; i++ {
					d += float64(q[tt*H*D+h*D+i]) * float64(seqs[s].k[p][g*D+i])
				}
				d *= float64(scale)
				sc = append(sc, d)
				m = math.Max(m, d)
			}
			var z float64
			for i := range sc {
				sc[i] = math.Exp(sc[i] - m)
				z += sc[i]
			}
			for i := 0; i < D; i++ {
				var want float64
				for p := 0; p <= pos; p++ {
					want += sc[p] / z * float64(seqs[s].v[p][g*D+i])
				}
				if d := math.Abs(float64(got[tt*H*D+h*D+i]) - want); d > 1e-5 {
					t.Fatalf("token %d head %d dim %d: %g, want %g", tt, h, i, got[tt*H*D+h*D+i], want)
				}
			}
		}
	}
}

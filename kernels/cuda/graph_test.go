package cuda

import (
	"math"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
)

// TestGraphReplaysWithNewInputs captures a linear → SwiGLU → attention
// chain, then changes the inputs (and the batch, in place) and checks that a
// replay computes what the CPU computes for the new inputs.
func TestGraphReplaysWithNewInputs(t *testing.T) {
	p := newPair(t)
	const T, K, N = 3, 264, 96
	w := p.weight(kernels.BF16, 0, [2]int{}, N, K)
	x := p.f32(1, T, K)
	g, u := p.poisoned(T, N), p.poisoned(T, N)
	heads, kv, d := 4, 2, 32
	const bs, nblocks = 16, 40
	slots := bs * nblocks
	kc := p.upload(kernels.F32, f32Bytes(p.randF32(slots*kv*d, 1)), slots, kv, d)
	vc := p.upload(kernels.F32, f32Bytes(p.randF32(slots*kv*d, 1)), slots, kv, d)
	ccache := &kernels.KVCache{K: kc.c, V: vc.c, BlockSize: bs, KVHeads: kv, HeadDim: d}
	gcache := &kernels.KVCache{K: kc.g, V: vc.g, BlockSize: bs, KVHeads: kv, HeadDim: d}
	q := p.f32(1, T, heads*d)
	att := p.poisoned(T, heads*d)
	ap := kernels.AttentionParams{Heads: heads, KVHeads: kv, HeadDim: d, Scale: float32(1 / math.Sqrt(float64(d)))}
	batch := attentionBatch(p, []int{1, 1, 1}, []int{100, 37, 150}, bs, nblocks)
	gm, err := p.gpu.NewBatchMeta(batch)
	must(t, "batch", err)
	defer p.gpu.FreeBatchMeta(gm)

	run := func(be kernels.Backend, x, w, g, u, q, att *kernels.Tensor, c *kernels.KVCache, m kernels.BatchMeta) error {
		if err := be.Linear(g, x, w, nil); err != nil {
			return err
		}
		if err := be.SiluMul(u, g, g); err != nil {
			return err
		}
		return be.Attention(att, q, c, ap, m)
	}
	must(t, "warm-up", run(p.gpu, x.g, w.g, g.g, u.g, q.g, att.g, gcache, gm))
	must(t, "begin", p.gpu.BeginCapture())
	must(t, "capture", run(p.gpu, x.g, w.g, g.g, u.g, q.g, att.g, gcache, gm))
	gr, err := p.gpu.EndCapture()
	must(t, "end", err)
	defer gr.Close()

	// New inputs and a new batch (same shape, shorter contexts), then replay.
	x2 := p.randF32(T*K, 1)
	must(t, "upload", p.gpu.Upload(x.g, f32Bytes(x2)), p.cpu.Upload(x.c, f32Bytes(x2)))
	batch2 := attentionBatch(p, []int{1, 1, 1}, []int{60, 140, 7}, bs, nblocks)
	must(t, "update", p.gpu.UpdateBatch(gm, batch2))
	must(t, "launch", gr.Launch())
	cm, err := p.cpu.UploadBatch(batch2)
	must(t, "cpu batch", err)
	must(t, "cpu", run(p.cpu, x.c, w.c, g.c, u.c, q.c, att.c, ccache, cm))
	p.check("replayed linear", g, 2e-5)
	p.check("replayed silu", u, 2e-5)
	p.check("replayed attention", att, 2e-5)
}

// TestCaptureScratchStaysWithGraphs: scratch freed during a capture is
// baked into the graph, so it must not be handed out after the capture
// (a tensor there would be overwritten by every replay), only to later captures.
func TestCaptureScratchStaysWithGraphs(t *testing.T) {
	b := gpu(t, Options{})
	p := b.pool
	p.capturing = true
	s, err := p.alloc(3 << 20)
	if err != nil {
		t.Fatal(err)
	}
	ptr := s.ptr
	p.put(s)
	p.capturing = false
	o, err := p.alloc(3 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer p.put(o)
	if o.ptr == ptr {
		t.Fatalf("a graph's scratch %#x was handed out after its capture", ptr)
	}
	p.capturing = true
	again, err := p.alloc(3 << 20)
	p.capturing = false
	if err != nil {
		t.Fatal(err)
	}
	if again.ptr != ptr {
		t.Errorf("a later capture did not reuse the graphs' scratch: got %#x, want %#x", again.ptr, ptr)
	}
	p.put(again)
}

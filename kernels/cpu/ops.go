package cpu

import (
	"fmt"
	"math"

	"github.com/glmtopo/glmtopo/kernels"
)

func (b *Backend) Embed(out, table, ids *kernels.Tensor) error {
	o, err := f32(out, "embed output")
	if err != nil {
		return err
	}
	idv, err := i32(ids, "embed ids")
	if err != nil {
		return err
	}
	tv, err := viewWeight(table)
	if err != nil {
		return err
	}
	h := tv.k
	if out.Cols() != h || out.Rows() != len(idv) {
		return fmt.Errorf("cpu: embed shapes: out %v, table [%d,%d], %d ids", out.Shape, tv.n, h, len(idv))
	}
	for t, id := range idv {
		if id < 0 { // a masked position (the MTP layer's position 0)
			clear(o[t*h : (t+1)*h])
			continue
		}
		if int(id) >= tv.n {
			return fmt.Errorf("cpu: embed: token id %d outside vocabulary %d", id, tv.n)
		}
		row := tv.rows(int(id), int(id)+1, o[t*h:(t+1)*h])
		copy(o[t*h:(t+1)*h], row)
	}
	return nil
}

// rmsnormRow writes w * x / sqrt(mean(x²)+eps); the sum of squares is in float64.
func rmsnormRow(out, x, w []float32, eps float32) {
	var ss float64
	for _, v := range x {
		ss += float64(v) * float64(v)
	}
	inv := float32(1 / math.Sqrt(float64(float32(ss/float64(len(x))))+float64(eps)))
	for i, v := range x {
		out[i] = w[i] * (v * inv)
	}
}

func (b *Backend) RMSNorm(out, x, w *kernels.Tensor, eps float32) error {
	o, err := f32(out, "rmsnorm output")
	if err != nil {
		return err
	}
	xs, err := f32(x, "rmsnorm input")
	if err != nil {
		return err
	}
	ws, err := f32(w, "rmsnorm weight")
	if err != nil {
		return err
	}
	h := len(ws)
	if x.Cols() != h || len(o) != len(xs) {
		return fmt.Errorf("cpu: rmsnorm shapes: x %v, w %d, out %v", x.Shape, h, out.Shape)
	}
	for r := 0; r < len(xs)/h; r++ {
		rmsnormRow(o[r*h:(r+1)*h], xs[r*h:(r+1)*h], ws, eps)
	}
	return nil
}

func (b *Backend) AddRMSNorm(resid, x, out, w *kernels.Tensor, eps float32) error {
	rs, err := f32(resid, "residual")
	if err != nil {
		return err
	}
	xs, err := f32(x, "add input")
	if err != nil {
		return err
	}
	if len(rs) != len(xs) {
		return fmt.Errorf("cpu: add-rmsnorm shapes: residual %v, x %v", resid.Shape, x.Shape)
	}
	for i, v := range xs {
		rs[i] += v
	}
	return b.RMSNorm(out, resid, w, eps)
}

func (b *Backend) SiluMul(out, gate, up *kernels.Tensor) error {
	o, err := f32(out, "silu output")
	if err != nil {
		return err
	}
	g, err := f32(gate, "gate")
	if err != nil {
		return err
	}
	u, err := f32(up, "up")
	if err != nil {
		return err
	}
	if len(g) != len(u) || len(o) != len(g) {
		return fmt.Errorf("cpu: silu-mul shapes: gate %v up %v out %v", gate.Shape, up.Shape, out.Shape)
	}
	siluMul(o, g, u)
	return nil
}

func siluMul(o, g, u []float32) {
	for i, v := range g {
		o[i] = v / (1 + float32(math.Exp(float64(-v)))) * u[i]
	}
}

func (b *Backend) Add(out, x, y *kernels.Tensor) error {
	o, err := f32(out, "add output")
	if err != nil {
		return err
	}
	a, err := f32(x, "add a")
	if err != nil {
		return err
	}
	c, err := f32(y, "add b")
	if err != nil {
		return err
	}
	if len(a) != len(c) || len(o) != len(a) {
		return fmt.Errorf("cpu: add shapes: %v + %v -> %v", x.Shape, y.Shape, out.Shape)
	}
	for i := range o {
		o[i] = a[i] + c[i]
	}
	return nil
}

func (b *Backend) Concat(out, x, y *kernels.Tensor) error {
	o, err := f32(out, "concat output")
	if err != nil {
		return err
	}
	a, err := f32(x, "concat a")
	if err != nil {
		return err
	}
	c, err := f32(y, "concat b")
	if err != nil {
		return err
	}
	na, nc := x.Cols(), y.Cols()
	rows := x.Rows()
	if y.Rows() != rows || out.Rows() != rows || out.Cols() != na+nc {
		return fmt.Errorf("cpu: concat shapes: %v ++ %v -> %v", x.Shape, y.Shape, out.Shape)
	}
	for r := 0; r < rows; r++ {
		copy(o[r*(na+nc):], a[r*na:(r+1)*na])
		copy(o[r*(na+nc)+na:], c[r*nc:(r+1)*nc])
	}
	return nil
}

func (b *Backend) QKNormRopeKV(q, k, v, qNorm, kNorm *kernels.Tensor, eps float32, rope kernels.RopeParams, kvHeads int, cache *kernels.KVCache, meta kernels.BatchMeta) error {
	bm, ok := meta.(batchMeta)
	if !ok {
		return fmt.Errorf("cpu: foreign batch metadata %T", meta)
	}
	qs, err := f32(q, "q")
	if err != nil {
		return err
	}
	ks, err := f32(k, "k")
	if err != nil {
		return err
	}
	vs, err := f32(v, "v")
	if err != nil {
		return err
	}
	kc, vc, err := kvViews(cache)
	if err != nil {
		return err
	}
	d, rot := rope.HeadDim, rope.RotaryDim
	T := bm.b.Tokens()
	if q.Rows() != T || q.Cols() != rope.Heads*d || k.Cols() != kvHeads*d || v.Cols() != kvHeads*d || k.Rows() != T || v.Rows() != T {
		return fmt.Errorf("cpu: qk-norm-rope shapes: q %v k %v v %v for %d tokens", q.Shape, k.Shape, v.Shape, T)
	}
	if rot > d || rot%2 != 0 {
		return fmt.Errorf("cpu: rotary dim %d invalid for head dim %d", rot, d)
	}
	var qn, kn []float32
	if qNorm != nil {
		if qn, err = f32(qNorm, "q norm"); err != nil {
			return err
		}
	}
	if kNorm != nil {
		if kn, err = f32(kNorm, "k norm"); err != nil {
			return err
		}
	}
	invFreq := ropeInvFreq(rot, rope.Theta)
	stride := cache.KVHeads * cache.HeadDim
	slots := kc.n / stride
	cos := make([]float32, rot/2)
	sin := make([]float32, rot/2)
	for t := 0; t < T; t++ {
		pos := float32(bm.b.Positions[t])
		for i, f := range invFreq {
			a := float64(pos * f)
			cos[i], sin[i] = float32(math.Cos(a)), float32(math.Sin(a))
		}
		for h := 0; h < rope.Heads; h++ {
			x := qs[t*rope.Heads*d+h*d : t*rope.Heads*d+(h+1)*d]
			if qn != nil {
				rmsnormRow(x, x, qn, eps)
			}
			applyRope(x, cos, sin)
		}
		slot := int(bm.b.Slots[t])
		if slot < 0 || slot >= slots {
			return fmt.Errorf("cpu: kv slot %d outside cache of %d slots", slot, slots)
		}
		for h := 0; h < kvHeads; h++ {
			x := ks[t*kvHeads*d+h*d : t*kvHeads*d+(h+1)*d]
			if kn != nil {
				rmsnormRow(x, x, kn, eps)
			}
			applyRope(x, cos, sin)
		}
		kc.put(slot*stride, ks[t*kvHeads*d:(t+1)*kvHeads*d])
		vc.put(slot*stride, vs[t*kvHeads*d:(t+1)*kvHeads*d])
	}
	return nil
}

// ropeInvFreq matches transformers: inv_freq[j] = 1 / theta^(2j/rot), in float32.
func ropeInvFreq(rot int, theta float64) []float32 {
	f := make([]float32, rot/2)
	for j := range f {
		f[j] = float32(1 / math.Pow(theta, float64(float32(2*j)/float32(rot))))
	}
	return f
}

// applyRope rotates the first 2·len(cos) dims in NeoX (rotate-half) layout.
func applyRope(x, cos, sin []float32) {
	half := len(cos)
	for i := 0; i < half; i++ {
		x1, x2 := x[i], x[i+half]
		x[i] = x1*cos[i] - x2*sin[i]
		x[i+half] = x2*cos[i] + x1*sin[i]
	}
}

func (b *Backend) Attention(out, q *kernels.Tensor, cache *kernels.KVCache, p kernels.AttentionParams, meta kernels.BatchMeta) error {
	bm, ok := meta.(batchMeta)
	if !ok {
		return fmt.Errorf("cpu: foreign batch metadata %T", meta)
	}
	o, err := f32(out, "attention output")
	if err != nil {
		return err
	}
	qs, err := f32(q, "q")
	if err != nil {
		return err
	}
	kc, vc, err := kvViews(cache)
	if err != nil {
		return err
	}
	d := p.HeadDim
	T := bm.b.Tokens()
	if q.Cols() != p.Heads*d || q.Rows() != T || len(o) != len(qs) || p.Heads%p.KVHeads != 0 {
		return fmt.Errorf("cpu: attention shapes: q %v out %v heads %d/%d", q.Shape, out.Shape, p.Heads, p.KVHeads)
	}
	group := p.Heads / p.KVHeads
	stride := p.KVHeads * d
	bs := cache.BlockSize
	batch := bm.b
	b.parallelFor(T*p.Heads, 1, func(lo, hi int) {
		var scores []float32
		var kbuf, vbuf []float32 // an e4m3 cache's rows, decoded
		if kc.fp8 != nil {
			kbuf, vbuf = make([]float32, d), make([]float32, d)
		}
		for job := lo; job < hi; job++ {
			t, h := job/p.Heads, job%p.Heads
			seq := batch.SeqIndex[t]
			table := batch.BlockTables[seq]
			n := int(batch.Positions[t]) + 1
			if cap(scores) < n {
				scores = make([]float32, n)
			}
			scores = scores[:n]
			qv := qs[t*p.Heads*d+h*d : t*p.Heads*d+(h+1)*d]
			g := h / group
			maxs := float32(math.Inf(-1))
			for pos := 0; pos < n; pos++ {
				slot := int(table[pos/bs])*bs + pos%bs
				s := dot(qv, kc.row(slot*stride+g*d, d, kbuf)) * p.Scale
				scores[pos] = s
				maxs = max(maxs, s)
			}
			var sum float64
			for pos, s := range scores {
				e := float32(math.Exp(float64(s - maxs)))
				scores[pos] = e
				sum += float64(e)
			}
			ov := o[t*p.Heads*d+h*d : t*p.Heads*d+(h+1)*d]
			clear(ov)
			inv := float32(1 / sum)
			for pos, e := range scores {
				slot := int(table[pos/bs])*bs + pos%bs
				vv := vc.row(slot*stride+g*d, d, vbuf)
				w := e * inv
				for i := range ov {
					ov[i] += w * vv[i]
				}
			}
		}
	})
	return nil
}

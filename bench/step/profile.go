package step

import (
	"fmt"
	"io"
	"sort"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cuda"
)

// profiler wraps the CUDA backend and times each operation with events,
// synchronising after each one: the device time per kind of operation of a
// step (its sum exceeds the step by nothing but the launch gaps it removes).
type profiler struct {
	*cuda.Backend
	tm    *cuda.Timer
	total map[string]float64
	calls map[string]int
	err   error
}

func (p *profiler) time(name string, fn func() error) error {
	if err := p.tm.Start(); err != nil {
		return err
	}
	if err := fn(); err != nil {
		return err
	}
	if err := p.tm.Stop(); err != nil {
		return err
	}
	s, err := p.tm.Seconds()
	if err != nil {
		return err
	}
	p.total[name] += s
	p.calls[name]++
	return nil
}

func shape(t *kernels.Tensor) string {
	if t == nil {
		return ""
	}
	return fmt.Sprintf("%v%v", t.DType, t.Shape)
}

func (p *profiler) Embed(out, table, ids *kernels.Tensor) error {
	return p.time("embed", func() error { return p.Backend.Embed(out, table, ids) })
}
func (p *profiler) RMSNorm(out, x, w *kernels.Tensor, eps float32) error {
	return p.time("rmsnorm", func() error { return p.Backend.RMSNorm(out, x, w, eps) })
}
func (p *profiler) AddRMSNorm(r, x, out, w *kernels.Tensor, eps float32) error {
	return p.time("add-rmsnorm", func() error { return p.Backend.AddRMSNorm(r, x, out, w, eps) })
}
func (p *profiler) Linear(out, x, w, bias *kernels.Tensor) error {
	return p.time("linear "+shape(w), func() error { return p.Backend.Linear(out, x, w, bias) })
}
func (p *profiler) QKNormRopeKV(q, k, v, qn, kn *kernels.Tensor, eps float32, rope kernels.RopeParams, kvh int, c *kernels.KVCache, m kernels.BatchMeta) error {
	return p.time("qk-norm-rope-kv", func() error { return p.Backend.QKNormRopeKV(q, k, v, qn, kn, eps, rope, kvh, c, m) })
}
func (p *profiler) Attention(out, q *kernels.Tensor, c *kernels.KVCache, ap kernels.AttentionParams, m kernels.BatchMeta) error {
	return p.time("attention", func() error { return p.Backend.Attention(out, q, c, ap, m) })
}
func (p *profiler) SiluMul(out, g, u *kernels.Tensor) error {
	return p.time("silu-mul", func() error { return p.Backend.SiluMul(out, g, u) })
}
func (p *profiler) Add(out, a, b *kernels.Tensor) error {
	return p.time("add", func() error { return p.Backend.Add(out, a, b) })
}
func (p *profiler) Route(ids, w, l, b *kernels.Tensor, rp kernels.RouterParams) error {
	return p.time("route", func() error { return p.Backend.Route(ids, w, l, b, rp) })
}
func (p *profiler) MoE(out, x, ids, w *kernels.Tensor, ex []*kernels.Expert) error {
	return p.time("moe experts", func() error { return p.Backend.MoE(out, x, ids, w, ex) })
}

func (p *profiler) MoEWithShared(out, x, ids, w *kernels.Tensor, ex []*kernels.Expert, sh *kernels.Expert) (bool, error) {
	var done bool
	err := p.time("moe experts + shared", func() error {
		var err error
		done, err = p.Backend.MoEWithShared(out, x, ids, w, ex, sh)
		return err
	})
	return done, err
}

func (p *profiler) LinearMulti(outs []*kernels.Tensor, x *kernels.Tensor, ws, bs []*kernels.Tensor) (bool, error) {
	var done bool
	err := p.time("linear x"+fmt.Sprint(len(ws))+" "+shape(ws[0]), func() error {
		var err error
		done, err = p.Backend.LinearMulti(outs, x, ws, bs)
		return err
	})
	return done, err
}

func (p *profiler) print(w io.Writer, title string) {
	names := make([]string, 0, len(p.total))
	var sum float64
	for n, s := range p.total {
		names = append(names, n)
		sum += s
	}
	sort.Slice(names, func(i, j int) bool { return p.total[names[i]] > p.total[names[j]] })
	fmt.Fprintf(w, "profile %s: %.3f ms in ops\n", title, sum*1e3)
	for _, n := range names {
		fmt.Fprintf(w, "  %-40s %5d calls %9.3f ms %5.1f%%\n", n, p.calls[n], p.total[n]*1e3, 100*p.total[n]/sum)
	}
}

package cpu

import (
	"fmt"
	"math"
	"sort"

	"github.com/glmtopo/glmtopo/kernels"
)

// Route implements GLM-4.5's router: sigmoid scores; choose with the
// correction bias added (group-limited: keep the TopKGroups groups whose two
// best biased scores sum highest); weight with the unbiased scores.
func (b *Backend) Route(ids, weights, logits, bias *kernels.Tensor, p kernels.RouterParams) error {
	lg, err := f32(logits, "router logits")
	if err != nil {
		return err
	}
	bv, err := f32(bias, "correction bias")
	if err != nil {
		return err
	}
	iv, err := i32(ids, "expert ids")
	if err != nil {
		return err
	}
	wv, err := f32(weights, "expert weights")
	if err != nil {
		return err
	}
	e, k := p.Experts, p.TopK
	if logits.Cols() != e || len(bv) != e || p.Groups <= 0 || e%p.Groups != 0 || k > e {
		return fmt.Errorf("cpu: route: logits %v, bias %d, params %+v", logits.Shape, len(bv), p)
	}
	T := logits.Rows()
	if len(iv) != T*k || len(wv) != T*k {
		return fmt.Errorf("cpu: route: outputs hold %d/%d entries, want %d", len(iv), len(wv), T*k)
	}
	for t := 0; t < T; t++ {
		routeToken(iv[t*k:(t+1)*k], wv[t*k:(t+1)*k], lg[t*e:(t+1)*e], bv, p)
	}
	return nil
}

func routeToken(ids []int32, w []float32, logits, bias []float32, p kernels.RouterParams) {
	e := p.Experts
	scores := make([]float32, e)
	choice := make([]float32, e)
	for i, l := range logits {
		scores[i] = float32(1 / (1 + math.Exp(-float64(l))))
		choice[i] = scores[i] + bias[i]
	}
	if p.Groups > 1 && p.TopKGroups < p.Groups {
		per := e / p.Groups
		type group struct {
			idx   int
			score float32
		}
		gs := make([]group, p.Groups)
		for g := range gs {
			top1, top2 := float32(math.Inf(-1)), float32(math.Inf(-1))
			for _, s := range choice[g*per : (g+1)*per] {
				if s > top1 {
					top1, top2 = s, top1
				} else if s > top2 {
					top2 = s
				}
			}
			gs[g] = group{g, top1 + top2}
		}
		sort.SliceStable(gs, func(i, j int) bool { return gs[i].score > gs[j].score })
		for _, g := range gs[p.TopKGroups:] {
			for i := g.idx * per; i < (g.idx+1)*per; i++ {
				choice[i] = float32(math.Inf(-1)) // a dropped group is never chosen
			}
		}
	}
	// Top-k by biased score; ties go to the lower index, as torch.topk does on CPU.
	order := make([]int, e)
	for i := range order {
		order[i] = i
	}
	sort.SliceStable(order, func(i, j int) bool { return choice[order[i]] > choice[order[j]] })
	var sum float32
	for j := range ids {
		ids[j] = int32(order[j])
		w[j] = scores[order[j]]
		sum += w[j]
	}
	for j := range w {
		if p.NormTopK {
			w[j] /= sum + 1e-20
		}
		w[j] *= p.Scale
	}
}

// MoE runs the routed experts: tokens are grouped per expert (the CPU twin of
// the GPU's permute → grouped GEMM → un-permute), each expert computes
// down(silu(gate·x) * up·x), and results are added back with their weights.
func (b *Backend) MoE(out, x, ids, weights *kernels.Tensor, experts []*kernels.Expert) error {
	o, err := f32(out, "moe output")
	if err != nil {
		return err
	}
	xs, err := f32(x, "moe input")
	if err != nil {
		return err
	}
	iv, err := i32(ids, "expert ids")
	if err != nil {
		return err
	}
	wv, err := f32(weights, "expert weights")
	if err != nil {
		return err
	}
	h, T := x.Cols(), x.Rows()
	if out.Cols() != h || out.Rows() != T || T == 0 || len(iv)%T != 0 || len(wv) != len(iv) {
		return fmt.Errorf("cpu: moe shapes: x %v out %v ids %d", x.Shape, out.Shape, len(iv))
	}
	k := len(iv) / T
	// Permute: token rows per expert, in token order.
	rows := make([][]int, len(experts))
	for t := 0; t < T; t++ {
		for j := 0; j < k; j++ {
			id := int(iv[t*k+j])
			if id < 0 || id >= len(experts) {
				return fmt.Errorf("cpu: moe: expert id %d outside %d experts", id, len(experts))
			}
			if experts[id] != nil {
				rows[id] = append(rows[id], t*k+j)
			}
		}
	}
	clear(o)
	for id, rs := range rows {
		if len(rs) == 0 {
			continue
		}
		ex := experts[id]
		gv, err := viewWeight(ex.Gate)
		if err != nil {
			return fmt.Errorf("cpu: moe expert %d gate: %w", id, err)
		}
		uv, err := viewWeight(ex.Up)
		if err != nil {
			return fmt.Errorf("cpu: moe expert %d up: %w", id, err)
		}
		dv, err := viewWeight(ex.Down)
		if err != nil {
			return fmt.Errorf("cpu: moe expert %d down: %w", id, err)
		}
		inter := gv.n
		if gv.k != h || uv.n != inter || uv.k != h || dv.n != h || dv.k != inter {
			return fmt.Errorf("cpu: moe expert %d shapes: gate [%d,%d] up [%d,%d] down [%d,%d] hidden %d",
				id, gv.n, gv.k, uv.n, uv.k, dv.n, dv.k, h)
		}
		n := len(rs)
		xe := make([]float32, n*h)
		for i, r := range rs {
			t := r / k
			copy(xe[i*h:(i+1)*h], xs[t*h:(t+1)*h])
		}
		g := make([]float32, n*inter)
		u := make([]float32, n*inter)
		b.linear(g, xe, n, &gv, nil)
		b.linear(u, xe, n, &uv, nil)
		siluMul(g, g, u)
		y := make([]float32, n*h)
		b.linear(y, g, n, &dv, nil)
		for i, r := range rs {
			t, wt := r/k, wv[r]
			orow := o[t*h : (t+1)*h]
			for c, v := range y[i*h : (i+1)*h] {
				orow[c] += wt * v
			}
		}
	}
	return nil
}

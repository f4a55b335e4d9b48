package model

import (
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"
)

// The all-to-all MoE dispatch (RankComm.AllToAll), shaped for prefill:
// every rank holds every token after TP attention, so each takes a
// contiguous slice of them (sequence-parallel MoE), routes it with the
// replicated router, sends each (token, expert) row to the ranks serving
// that expert (one all-to-all-v), runs its experts on the rows it got and
// sends the weighted results back (a second all-to-all-v); each token's
// owner sums its results in a fixed order, and an all-gather puts the
// whole [T, H] back on every rank. The shared expert travels as one more
// route, to the owner's TP group (each rank of which holds a slice), so it
// works for any TP without a reduction of its own.
//
// A row on the wire is [expert id, weight, x...] (H+2 values, the id
// exact in f32 below 2^24; sharedID for the shared expert); a result is
// the H values of weight · expert(x), in the order the rows came.

const sharedID = -1

// dispatch is one MoE layer's all-to-all on one rank.
type dispatch struct {
	f          *Forward
	lw         *LayerWeights
	ex         kernels.Exchanger
	srv        ExpertServers
	size, rank int
	t0, t1     int // this rank's tokens
	hidden, k  int
	ids        []int32   // [t1-t0, k]
	wts        []float32 // [t1-t0, k]
}

// moeAllToAll is moe with all-to-all dispatch: it returns the whole MoE
// output [T, H] (no all-reduce follows).
func (f *Forward) moeAllToAll(lw *LayerWeights, xn *kernels.Tensor) *kernels.Tensor {
	if f.err != nil {
		return nil
	}
	c := f.Ranks.MoE
	ex, ok := c.(kernels.Exchanger)
	if c == nil || !ok {
		f.err = fmt.Errorf("all-to-all dispatch: the MoE communicator %T has no all-to-all-v", c)
		return nil
	}
	d := &dispatch{f: f, lw: lw, ex: ex, srv: f.Ranks.AllToAll, size: c.Size(), rank: c.Rank(),
		hidden: f.Cfg.HiddenSize, k: f.Cfg.NumExpertsPerTok}
	d.t0, d.t1 = d.rank*f.T/d.size, (d.rank+1)*f.T/d.size
	m := f.tmp(d.hidden)
	if f.err != nil {
		return nil
	}
	out, err := d.run(xn)
	if err == nil {
		err = f.BE.Upload(m, f32Bytes(out))
	}
	f.do("moe all-to-all", err)
	return m
}

func (d *dispatch) run(xn *kernels.Tensor) ([]float32, error) {
	xs, err := d.f.BE.Download(xn)
	if err != nil {
		return nil, err
	}
	own := xs[d.t0*d.hidden : d.t1*d.hidden]
	if err := d.route(own); err != nil {
		return nil, err
	}
	send := d.pack(own)
	recv, err := d.ex.AllToAllV(send)
	if err != nil {
		return nil, fmt.Errorf("dispatch: %w", err)
	}
	back, err := d.serve(recv)
	if err != nil {
		return nil, err
	}
	res, err := d.ex.AllToAllV(back)
	if err != nil {
		return nil, fmt.Errorf("combine: %w", err)
	}
	sum, err := d.combine(send, res)
	if err != nil {
		return nil, err
	}
	all, err := d.ex.AllGatherV(sum)
	if err != nil {
		return nil, fmt.Errorf("all-gather: %w", err)
	}
	if len(all) != d.f.T*d.hidden {
		return nil, fmt.Errorf("all-gather: %d values for %d tokens × hidden %d", len(all), d.f.T, d.hidden)
	}
	return all, nil
}

// route runs the router over the rank's tokens.
func (d *dispatch) route(own []float32) error {
	n, c, be := d.t1-d.t0, d.f.Cfg, d.f.BE
	if n == 0 {
		return nil
	}
	x, logits := d.f.tmpOf(kernels.F32, n, d.hidden), d.f.tmpOf(kernels.F32, n, c.NRoutedExperts)
	ids, wts := d.f.tmpOf(kernels.I32, n, d.k), d.f.tmpOf(kernels.F32, n, d.k)
	if d.f.err != nil {
		return d.f.err
	}
	if err := be.Upload(x, f32Bytes(own)); err != nil {
		return err
	}
	if err := be.Linear(logits, x, d.lw.Router, nil); err != nil {
		return fmt.Errorf("router: %w", err)
	}
	rp := kernels.RouterParams{Experts: c.NRoutedExperts, TopK: d.k, Groups: c.NGroup,
		TopKGroups: c.TopKGroup, NormTopK: c.NormTopKProb, Scale: float32(c.RoutedScalingFactor)}
	if err := be.Route(ids, wts, logits, d.lw.RouterBias, rp); err != nil {
		return fmt.Errorf("route: %w", err)
	}
	var err error
	if d.ids, err = be.DownloadI32(ids); err != nil {
		return err
	}
	if d.wts, err = be.Download(wts); err != nil {
		return err
	}
	if len(d.ids) != n*d.k || len(d.wts) != n*d.k {
		return fmt.Errorf("route: %d ids and %d weights for %d tokens × top-%d", len(d.ids), len(d.wts), n, d.k)
	}
	return d.checkServers()
}

// checkServers refuses routes no rank serves: they would drop out of the
// sum silently.
func (d *dispatch) checkServers() error {
	if _, n := d.srv.Shared(); d.lw.SharedGate != nil && n < 1 {
		return fmt.Errorf("dispatch: no rank serves layer %d's shared expert", d.lw.Index)
	}
	for i, e := range d.ids {
		if first, n := d.srv.Routed(d.lw.Index, d.t0+i/d.k, int(e)); n < 1 || first < 0 || first+n > d.size {
			return fmt.Errorf("dispatch: layer %d, token %d: expert %d is served by ranks [%d,%d) of %d", d.lw.Index, d.t0+i/d.k, e, first, first+n, d.size)
		}
	}
	return nil
}

// each calls fn for every route of the rank's tokens, in the fixed order
// both pack and combine walk: token by token, its experts in top-k order
// then the shared expert, each over its serving ranks in rank order.
func (d *dispatch) each(fn func(i, dst, expert int, w float32)) {
	shFirst, shN := 0, 0
	if d.lw.SharedGate != nil {
		shFirst, shN = d.srv.Shared()
	}
	for i := 0; i < d.t1-d.t0; i++ {
		for j := 0; j < d.k; j++ {
			e, w := int(d.ids[i*d.k+j]), d.wts[i*d.k+j]
			first, n := d.srv.Routed(d.lw.Index, d.t0+i, e)
			for r := first; r < first+n; r++ {
				fn(i, r, e, w)
			}
		}
		for r := shFirst; r < shFirst+shN; r++ {
			fn(i, r, sharedID, 1)
		}
	}
}

// pack lays out the rows for each rank.
func (d *dispatch) pack(own []float32) [][]float32 {
	send := make([][]float32, d.size)
	d.each(func(i, dst, e int, w float32) {
		send[dst] = append(send[dst], float32(e), w)
		send[dst] = append(send[dst], own[i*d.hidden:(i+1)*d.hidden]...)
	})
	return send
}

// unpack checks the rows from peer p and sorts them into routed rows
// (x, expert, weight) and shared rows.
func (d *dispatch) unpack(recv [][]float32) (routed, shared []float32, ids []int32, wts []float32, err error) {
	w := d.hidden + 2
	for p, rows := range recv {
		if len(rows)%w != 0 {
			return nil, nil, nil, nil, fmt.Errorf("dispatch: %d values from rank %d are not rows of %d", len(rows), p, w)
		}
		for o := 0; o < len(rows); o += w {
			e, x := rows[o], rows[o+2:o+w]
			if e == sharedID {
				shared = append(shared, x...)
				continue
			}
			id := int(e)
			if float32(id) != e || id < 0 || id >= len(d.lw.Experts) || d.lw.Experts[id] == nil {
				return nil, nil, nil, nil, fmt.Errorf("dispatch: rank %d sent rank %d a row for expert %v, which it does not hold", p, d.rank, e)
			}
			routed, ids, wts = append(routed, x...), append(ids, int32(id)), append(wts, rows[o+1])
		}
	}
	return routed, shared, ids, wts, nil
}

// serve runs the rank's experts on the rows it got and lays out the
// results for their senders, in the rows' order.
func (d *dispatch) serve(recv [][]float32) ([][]float32, error) {
	routed, shared, ids, wts, err := d.unpack(recv)
	if err != nil {
		return nil, err
	}
	ry, err := d.experts(routed, ids, wts)
	if err != nil {
		return nil, err
	}
	sy, err := d.sharedExpert(shared)
	if err != nil {
		return nil, err
	}
	back := make([][]float32, d.size)
	w, h := d.hidden+2, d.hidden
	for p, rows := range recv {
		back[p] = make([]float32, 0, len(rows)/w*h)
		for o := 0; o < len(rows); o += w {
			if rows[o] == sharedID {
				back[p], sy = append(back[p], sy[:h]...), sy[h:]
			} else {
				back[p], ry = append(back[p], ry[:h]...), ry[h:]
			}
		}
	}
	return back, nil
}

// experts is Σ weight · expert(x) for routed rows, one route each.
func (d *dispatch) experts(x []float32, ids []int32, wts []float32) ([]float32, error) {
	n := len(ids)
	if n == 0 {
		return nil, nil
	}
	f, be := d.f, d.f.BE
	xt, it, wt, yt := f.tmpOf(kernels.F32, n, d.hidden), f.tmpOf(kernels.I32, n, 1), f.tmpOf(kernels.F32, n, 1), f.tmpOf(kernels.F32, n, d.hidden)
	if f.err != nil {
		return nil, f.err
	}
	for _, e := range []error{be.Upload(xt, f32Bytes(x)), be.Upload(it, i32Bytes(ids)), be.Upload(wt, f32Bytes(wts))} {
		if e != nil {
			return nil, e
		}
	}
	if err := be.MoE(yt, xt, it, wt, d.lw.Experts); err != nil {
		return nil, fmt.Errorf("experts: %w", err)
	}
	return be.Download(yt)
}

// sharedExpert runs the rank's shared-expert slice on the shared rows.
func (d *dispatch) sharedExpert(x []float32) ([]float32, error) {
	n := len(x) / d.hidden
	if n == 0 {
		return nil, nil
	}
	if d.lw.SharedGate == nil {
		return nil, fmt.Errorf("dispatch: rows for the shared expert of layer %d, which has none", d.lw.Index)
	}
	f := &Forward{Cfg: d.f.Cfg, BE: d.f.BE, T: n}
	defer f.Release()
	xt := f.tmp(d.hidden)
	if f.err != nil {
		return nil, f.err
	}
	if err := f.BE.Upload(xt, f32Bytes(x)); err != nil {
		return nil, err
	}
	y := f.mlp(xt, d.lw.SharedGate, d.lw.SharedUp, d.lw.SharedDown)
	if f.err != nil {
		return nil, fmt.Errorf("shared expert: %w", f.err)
	}
	return f.BE.Download(y)
}

// combine sums each own token's results in the order each walks, after
// checking every rank returned one result per row sent to it.
func (d *dispatch) combine(send, res [][]float32) ([]float32, error) {
	w, h := d.hidden+2, d.hidden
	for p := range send {
		if want := len(send[p]) / w * h; len(res[p]) != want {
			return nil, fmt.Errorf("combine: rank %d returned %d values for the %d rows sent to it (want %d)", p, len(res[p]), len(send[p])/w, want)
		}
	}
	out := make([]float32, (d.t1-d.t0)*h)
	next := make([]int, d.size)
	d.each(func(i, dst, _ int, _ float32) {
		row, y := out[i*h:(i+1)*h], res[dst][next[dst]:next[dst]+h]
		for c, v := range y {
			row[c] += v
		}
		next[dst] += h
	})
	return out, nil
}

package tp

import (
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"

	"github.com/glmtopo/glmtopo/model"
)

// The MoE dispatches a Group can run (Options.Dispatch).
const (
	// DispatchAllReduce: every rank runs its experts on the tokens routed
	// to them and one all-reduce sums the partials (vLLM's default; the
	// one decode's CUDA graphs hold).
	DispatchAllReduce = "allreduce"
	// DispatchAllToAll: each rank routes its slice of the tokens and
	// exchanges rows with the experts' ranks by all-to-all-v, then an
	// all-gather (model's dispatch.go). Its counts reach the host each MoE
	// layer, so on GPU ranks it runs in eager steps (prefill) only; the
	// decode graphs keep the all-reduce.
	DispatchAllToAll = "alltoall"
)

// checkDispatch refuses a dispatch the grid or the collectives cannot run.
func checkDispatch(g *Grid, opt Options) error {
	switch opt.Dispatch {
	case "", DispatchAllReduce:
		return nil
	case DispatchAllToAll:
	default:
		return fmt.Errorf("rank group: expert dispatch %q: want %q or %q", opt.Dispatch, DispatchAllReduce, DispatchAllToAll)
	}
	if g.EP < 2 {
		return fmt.Errorf("rank group %s: the %s expert dispatch needs expert parallelism (EP ≥ 2)", g, DispatchAllToAll)
	}
	return nil
}

// servers is rank r's model.ExpertServers over the grid.
type servers struct {
	g *Grid
	r int
}

var _ model.ExpertServers = servers{}

// Routed is the EP group of the replica serving (token, e) — replica
// token mod replicas in placement order, as replicaMask chooses — whose
// ExpertTP ranks each hold a slice of e.
func (s servers) Routed(l, token, e int) (first, n int) {
	h := s.g.holders[l]
	if e < 0 || e >= len(h) || len(h[e]) == 0 {
		return 0, 0 // NewGrid places every expert; Route gives ids in range
	}
	n = s.g.ExpertTP()
	return h[e][token%len(h[e])] * n, n
}

// Shared is r's TP group: its ranks hold the shared expert's TP slices.
func (s servers) Shared() (first, n int) { return s.g.Replica(s.r) * s.g.TP, s.g.TP }

// checkExchangers refuses the all-to-all dispatch over communicators that
// cannot exchange rows (before a step would find out).
func checkExchangers(g *Grid, c *Comms) error {
	for r, rc := range c.Ranks {
		if _, ok := rc.MoE.(kernels.Exchanger); !ok {
			return fmt.Errorf("rank group %s: the %s expert dispatch needs all-to-all-v; rank %d's MoE communicator %T has none", g, DispatchAllToAll, r, rc.MoE)
		}
	}
	return nil
}

// Package tp runs a stage's decoder layers on several ranks: tensor
// parallelism for attention, the dense MLP and the shared expert, expert
// parallelism (with EPLB replicas) for the routed experts. Grid lays the
// ranks out, in one place, from the sizes and the planner's expert
// placement; Group drives one goroutine per rank, its sums through
// in-process collectives (the CPU reference) or through communicators from
// Options.Collectives: NCCL over one host's GPUs (nccl.go), each rank's
// all-reduces queued on its CUDA backend's stream. Group.Do runs a step
// function on every rank under the step's failure rules, which parallel's
// device path (rank 0 on the engine's backend, decode graphs) builds on;
// ReplicaTables puts a rank's EPLB replica mask on its device.
package tp

import (
	"fmt"
	"slices"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/topology"
)

// Grid is the rank layout of a stage's layers [First, End).
//
// Rank r holds attention slice r%TP (ranks r/TP = 0, 1, ... are replicas of
// the whole attention when TP < Ranks), and belongs to EP group
// r/(Ranks/EP), holding slice r%(Ranks/EP) of each routed expert its group
// holds. vLLM's --tensor-parallel-size N is Ranks = TP = N, EP = 1 (every
// expert split N ways); with --enable-expert-parallel, EP = N (whole
// experts per rank).
type Grid struct {
	Cfg         *model.Config
	First, End  int
	Ranks       int
	TP, EP      int
	holders     map[int][][]int // per MoE layer, per expert: the EP groups holding its replicas, in placement order
	placeSource string
}

// NewGrid checks the sizes against cfg and resolves the routed experts'
// placement over the EP groups: experts' entries for the layers of
// [first, end) (the plan's topology.LayerExperts, one list per EP group,
// an expert listed on several groups being replicated), contiguous blocks
// of experts per group for layers without one.
func NewGrid(cfg *model.Config, first, end, ranks, tp, ep int, experts []topology.LayerExperts) (*Grid, error) {
	switch {
	case first < 0 || end <= first || end > cfg.NumHiddenLayers:
		return nil, fmt.Errorf("rank grid: layers [%d,%d) of %d", first, end, cfg.NumHiddenLayers)
	case ranks < 1 || tp < 1 || ep < 1:
		return nil, fmt.Errorf("rank grid: %d ranks, TP %d, EP %d: each must be at least 1", ranks, tp, ep)
	case ranks%tp != 0 || ranks%ep != 0:
		return nil, fmt.Errorf("rank grid: TP %d and EP %d must divide the %d ranks", tp, ep, ranks)
	case ep > 1 && ep > cfg.NRoutedExperts:
		return nil, fmt.Errorf("rank grid: EP %d exceeds the %d routed experts", ep, cfg.NRoutedExperts)
	}
	g := &Grid{Cfg: cfg, First: first, End: end, Ranks: ranks, TP: tp, EP: ep, holders: map[int][][]int{}, placeSource: "contiguous"}
	for r := 0; r < ranks; r++ {
		sh := g.Shard(r)
		if err := sh.Validate(cfg); err != nil {
			return nil, fmt.Errorf("rank grid: %w", err)
		}
	}
	given := map[int]topology.LayerExperts{}
	for _, le := range experts {
		if le.Layer < first || le.Layer >= end {
			continue // another stage's layer
		}
		if cfg.LayerKind(le.Layer) == model.LayerDense {
			return nil, fmt.Errorf("rank grid: expert placement for dense layer %d", le.Layer)
		}
		given[le.Layer] = le
		g.placeSource = "plan"
	}
	for l := first; l < end; l++ {
		if cfg.LayerKind(l) == model.LayerDense {
			continue
		}
		h, err := g.place(l, given)
		if err != nil {
			return nil, fmt.Errorf("rank grid: layer %d: %w", l, err)
		}
		g.holders[l] = h
	}
	return g, nil
}

// place resolves layer l's holders from the given placement or by blocks.
func (g *Grid) place(l int, given map[int]topology.LayerExperts) ([][]int, error) {
	E := g.Cfg.NRoutedExperts
	holders := make([][]int, E)
	le, ok := given[l]
	if !ok {
		for grp := 0; grp < g.EP; grp++ {
			for e := grp * E / g.EP; e < (grp+1)*E/g.EP; e++ {
				holders[e] = append(holders[e], grp)
			}
		}
		return holders, nil
	}
	if len(le.GPUs) != g.EP {
		return nil, fmt.Errorf("placement lists %d GPUs, the grid has %d EP groups", len(le.GPUs), g.EP)
	}
	for grp, list := range le.GPUs {
		for _, e := range list {
			if e < 0 || e >= E {
				return nil, fmt.Errorf("placement puts expert %d (of %d) on GPU %d", e, E, grp)
			}
			// One replica per group: a group's index among an expert's
			// holders is its replica (replicaMask, the device tables).
			if slices.Contains(holders[e], grp) {
				return nil, fmt.Errorf("placement lists expert %d twice on GPU %d", e, grp)
			}
			holders[e] = append(holders[e], grp)
		}
	}
	for e, h := range holders {
		if len(h) == 0 {
			return nil, fmt.Errorf("expert %d is on no GPU", e)
		}
		if le.Replicas != nil && (len(le.Replicas) != E || le.Replicas[e] != len(h)) {
			return nil, fmt.Errorf("expert %d has %d replicas in the GPU lists, replicas says %v", e, len(h), le.Replicas)
		}
	}
	return holders, nil
}

// TPRank and Replica are rank r's attention slice and attention replica.
func (g *Grid) TPRank(r int) int  { return r % g.TP }
func (g *Grid) Replica(r int) int { return r / g.TP }

// ExpertTP is how many ways each routed expert is split inside its EP group.
func (g *Grid) ExpertTP() int { return g.Ranks / g.EP }

// Group is rank r's EP group.
func (g *Grid) Group(r int) int { return r / g.ExpertTP() }

// Shard is rank r's slices.
func (g *Grid) Shard(r int) model.Shard {
	return model.Shard{TP: g.TP, TPRank: g.TPRank(r), ExpertTP: g.ExpertTP(), ExpertTPRank: r % g.ExpertTP()}
}

// Holds reports whether rank r holds routed expert e of layer l.
func (g *Grid) Holds(r, l, e int) bool {
	h, ok := g.holders[l]
	return ok && e >= 0 && e < len(h) && slices.Contains(h[e], g.Group(r))
}

// Selection is what rank r loads: its layers' slices and experts.
func (g *Grid) Selection(r int) model.Selection {
	sh := g.Shard(r)
	return model.Selection{FirstLayer: g.First, EndLayer: g.End, Shard: &sh,
		Expert: func(l, e int) bool { return g.Holds(r, l, e) }}
}

// comm is the RankComm of rank r with its collectives (those the grid
// does not need are left out).
func (g *Grid) comm(r int, tp, moe kernels.Collective) *model.RankComm {
	rc := &model.RankComm{SharedExpert: g.Replica(r) == 0, Replicas: replicaMask{g, g.Group(r)}}
	if g.TP > 1 {
		rc.TP = tp
	}
	if g.Ranks > 1 {
		rc.MoE = moe
	}
	return rc
}

// replicaMask serves each (token, expert) on one replica: replica token mod
// replicas, in placement order — deterministic, and spreading a hot
// expert's tokens evenly over its replicas.
type replicaMask struct {
	g     *Grid
	group int
}

func (m replicaMask) Replicated(l int) bool {
	for _, h := range m.g.holders[l] {
		if len(h) > 1 && slices.Contains(h, m.group) {
			return true
		}
	}
	return false
}

func (m replicaMask) Serves(l, token, e int) bool {
	h := m.g.holders[l]
	if e < 0 || e >= len(h) || len(h[e]) == 0 {
		return false
	}
	return h[e][token%len(h[e])] == m.group
}

// String describes the layout for logs.
func (g *Grid) String() string {
	experts := "whole experts"
	if g.ExpertTP() > 1 {
		experts = fmt.Sprintf("experts split %d ways", g.ExpertTP())
	}
	return fmt.Sprintf("%d ranks: TP %d (attention ×%d), EP %d (%s, %s placement)",
		g.Ranks, g.TP, g.Ranks/g.TP, g.EP, experts, g.placeSource)
}

package parallel

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/parallel/tp"
)

// graphComm is a collective on a graph double whose sums and broadcasts
// are device operations, recorded while the double captures and run at
// launch, as NCCL's are in a CUDA graph: the rank group's graphs are
// tested on the CPU with it. Its ranks meet at a barrier; TP = ranks, so
// one communicator serves TP and MoE.
type graphComm struct {
	be   *graphCPU
	bar  *barrier
	rank int
}

var (
	_ kernels.Collective  = (*graphComm)(nil)
	_ kernels.Broadcaster = (*graphComm)(nil)
)

func (c *graphComm) Size() int { return c.bar.size }
func (c *graphComm) Rank() int { return c.rank }

func (c *graphComm) AllReduceSum(t *kernels.Tensor) error {
	return c.round(t, func(parts [][]float32) []float32 {
		sum := make([]float32, len(parts[c.rank]))
		for _, p := range parts { // rank order: every rank gets the same bits
			for i, v := range p {
				sum[i] += v
			}
		}
		return sum
	})
}

func (c *graphComm) Broadcast(t *kernels.Tensor, root int) error {
	return c.round(t, func(parts [][]float32) []float32 { return parts[root] })
}

// round is one device op: every rank's t meets the others' at the barrier
// and becomes combine of them.
func (c *graphComm) round(t *kernels.Tensor, combine func(parts [][]float32) []float32) error {
	return c.be.device(func() error {
		x, err := c.be.Backend.Download(t)
		if err != nil {
			return err
		}
		parts, err := c.bar.meet(c.rank, x)
		if err != nil {
			return err
		}
		return c.be.Backend.Upload(t, f32Bytes(combine(parts)))
	})
}

// barrier is one round of parts from every rank at a time.
type barrier struct {
	size    int
	mu      sync.Mutex
	parts   [][]float32
	arrived int
	done    chan struct{}
}

func (b *barrier) meet(rank int, part []float32) ([][]float32, error) {
	b.mu.Lock()
	if b.done == nil {
		b.done, b.parts = make(chan struct{}), make([][]float32, b.size)
	}
	done, parts := b.done, b.parts
	parts[rank] = part
	if b.arrived++; b.arrived == b.size {
		b.arrived, b.done = 0, nil
		close(done)
	}
	b.mu.Unlock()
	select {
	case <-done:
		return parts, nil
	case <-time.After(20 * time.Second):
		return nil, fmt.Errorf("graph comm: rank %d waited 20s for its peers", rank)
	}
}

// graphComms is a tp.Collectives factory of graphComms (TP = ranks only).
func graphComms(ctx context.Context, g *tp.Grid, bes []kernels.Backend) (*tp.Comms, error) {
	if g.TP != g.Ranks {
		return nil, fmt.Errorf("graph comms: TP %d of %d ranks; the double serves TP = ranks", g.TP, g.Ranks)
	}
	bar := &barrier{size: g.Ranks}
	c := &tp.Comms{Ranks: make([]tp.RankComms, g.Ranks)}
	for r, be := range bes {
		gb, ok := be.(*graphCPU)
		if !ok {
			return nil, fmt.Errorf("graph comms: rank %d's backend %T is not a graph double", r, be)
		}
		gc := &graphComm{be: gb, bar: bar, rank: r}
		c.Ranks[r] = tp.RankComms{TP: gc, MoE: gc}
	}
	return c, nil
}

// TestRankGraphsMatchOneRank serves the scheduler's mixed workload on
// ranks whose rank 0 is the engine's backend and whose decode steps replay
// per-rank graphs (graph doubles, collectives recorded in them), and
// compares the tokens with one process's; the group must have replayed.
func TestRankGraphsMatchOneRank(t *testing.T) {
	dir := fixtureDir("tiny")
	items, want := referenceWork(t, dir, schedOpt)
	cfg, err := model.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name      string
		ranks, ep int
		lists     [][]int // EPLB placement: the replica mask runs in the graphs
	}{{"tp2", 2, 1, nil}, {"tp4+ep4", 4, 4, nil}, {"eplb-tp2+ep2", 2, 2, [][]int{{0, 1, 2, 3, 4, 5}, {2, 3, 4, 5, 6, 7}}}} {
		t.Run(c.name, func(t *testing.T) {
			bes := []*graphCPU{newGraphCPU()}
			opt := smallKV
			opt.Ranks = RankOptions{Ranks: c.ranks, TP: c.ranks, EP: c.ep, ShareHead: true, Collectives: graphComms,
				NewBackend: func(int) (kernels.Backend, error) {
					be := newGraphCPU()
					bes = append(bes, be)
					return be, nil
				}}
			if c.lists != nil {
				opt.Ranks.Experts = placement(cfg, c.lists)
			}
			e, closeEngine, err := Open(context.Background(), ModelSource{Path: dir}, bes[0], opt, nil)
			if err != nil {
				t.Fatal(err)
			}
			s := NewScheduler(e, schedOpt)
			compareWork(t, runWorkload(t, s, items), want)
			s.Close()
			st := e.GraphStats()
			t.Logf("rank graphs: %+v", st)
			if st.Captures == 0 || st.Replays == 0 || st.Graphs != st.Captures {
				t.Errorf("rank graphs %+v: want captures, replays, and every capture alive", st)
			}
			for r, be := range bes {
				if be.graphs != st.Graphs || len(be.misuse) > 0 {
					t.Errorf("rank %d: %d graphs on its backend (want %d), misuse %v", r, be.graphs, st.Graphs, be.misuse)
				}
			}
			closeEngine()
			for r, be := range bes {
				if be.graphs != 0 {
					t.Errorf("rank %d: %d graphs left after close", r, be.graphs)
				}
			}
		})
	}
}

// TestRankGraphCaptureFailureFallsBack: a peer whose backend refuses to
// capture fails the engine's capture too; the engine then steps eagerly
// (the peers' graphs freed with its own) and the tokens stay one process's.
func TestRankGraphCaptureFailureFallsBack(t *testing.T) {
	dir := fixtureDir("tiny")
	items, want := referenceWork(t, dir, schedOpt)
	bes := []*graphCPU{newGraphCPU()}
	opt := smallKV
	opt.Ranks = RankOptions{Ranks: 2, TP: 2, EP: 1, ShareHead: true, Collectives: graphComms,
		NewBackend: func(int) (kernels.Backend, error) {
			be := newGraphCPU()
			be.failEnd = true
			bes = append(bes, be)
			return be, nil
		}}
	e, closeEngine, err := Open(context.Background(), ModelSource{Path: dir}, bes[0], opt, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer closeEngine()
	s := NewScheduler(e, schedOpt)
	compareWork(t, runWorkload(t, s, items), want)
	s.Close()
	if st := e.GraphStats(); st.Replays != 0 || st.Graphs != 0 {
		t.Errorf("graph stats %+v after a peer's capture failed: want no graph and no replay", st)
	}
	for r, be := range bes {
		if be.graphs != 0 {
			t.Errorf("rank %d: %d graphs alive after the fallback", r, be.graphs)
		}
	}
}

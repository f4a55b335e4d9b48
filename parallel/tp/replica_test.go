package tp

import (
	"fmt"
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/topology"
)

// eplbGrid is 4 ranks, EP 4 (whole experts), with experts 0, 1 and 2
// replicated on layers 1 and 3 and layer 2 unreplicated; group 3 (rank 3)
// holds no replica of layer 3.
func eplbGrid(t *testing.T, ranks, tp int) *Grid {
	t.Helper()
	c := tinyConfig(t)
	repl := [][]int{{0, 1, 2, 3, 4, 5}, {0, 6, 7, 8, 9, 10}, {0, 11, 12, 13, 1}, {14, 15, 1, 2}}
	alone := [][]int{{0, 1, 2, 3}, {4, 5, 6, 7}, {8, 9, 10, 11}, {12, 13, 14, 15}}
	noLast := [][]int{{0, 1, 2, 3, 14}, {4, 5, 6, 7, 14}, {8, 9, 10, 11}, {12, 13, 15}}
	place := []topology.LayerExperts{{Layer: 1, GPUs: repl}, {Layer: 2, GPUs: alone}, {Layer: 3, GPUs: noLast}}
	g, err := NewGrid(c, 0, c.NumHiddenLayers, ranks, tp, 4, place)
	if err != nil {
		t.Fatal(err)
	}
	return g
}

// TestReplicaTablesAgreeWithMask: every rank's device table gives, by the
// rule of kernels.ReplicaMasker, the grid's choice (replicaMask.Serves) for
// every route to an expert the rank holds; layers (and ranks) without a
// replicated expert get no table.
func TestReplicaTablesAgreeWithMask(t *testing.T) {
	for _, sz := range [][2]int{{4, 4}, {8, 2}} { // ranks, TP (8 ranks: experts split 2 ways)
		g := eplbGrid(t, sz[0], sz[1])
		t.Run(g.String(), func(t *testing.T) {
			for r := 0; r < g.Ranks; r++ {
				be := cpu.New(1)
				rt, err := g.ReplicaTables(r, be)
				if err != nil {
					t.Fatal(err)
				}
				m := replicaMask{g, g.Group(r)}
				for l := 0; l < g.Cfg.NumHiddenLayers; l++ {
					tab := rt.Table(l)
					if (tab != nil) != m.Replicated(l) {
						t.Fatalf("rank %d layer %d: table %v, replicated %v", r, l, tab != nil, m.Replicated(l))
					}
					if tab != nil {
						checkTable(t, g, m, r, l, be, tab)
					}
				}
				rt.Free()
				if rt.Layers() != 0 {
					t.Fatalf("rank %d: %d tables left after Free", r, rt.Layers())
				}
			}
		})
	}
}

// checkTable compares layer l's table with m for tokens 0..59.
func checkTable(t *testing.T, g *Grid, m replicaMask, r, l int, be kernels.Backend, tab *kernels.Tensor) {
	t.Helper()
	v, err := be.DownloadI32(tab)
	if err != nil {
		t.Fatal(err)
	}
	if len(v) != 2*g.Cfg.NRoutedExperts {
		t.Fatalf("rank %d layer %d: table of %d entries", r, l, len(v))
	}
	for e := 0; e < g.Cfg.NRoutedExperts; e++ {
		n, idx := v[2*e], v[2*e+1]
		if (idx >= 0) != g.Holds(r, l, e) || n < 1 {
			t.Fatalf("rank %d layer %d expert %d: entry (%d, %d), holds %v", r, l, e, n, idx, g.Holds(r, l, e))
		}
		if !g.Holds(r, l, e) {
			continue
		}
		for tok := 0; tok < 60; tok++ {
			if got, want := kernels.ReplicaServes(tok, n, idx), m.Serves(l, tok, e); got != want {
				t.Fatalf("rank %d layer %d token %d expert %d: table serves %v, mask %v", r, l, tok, e, got, want)
			}
		}
	}
}

func TestReplicaTablesNone(t *testing.T) {
	c := tinyConfig(t)
	plain, err := NewGrid(c, 0, c.NumHiddenLayers, 4, 2, 4, nil) // contiguous: no replicas
	if err != nil {
		t.Fatal(err)
	}
	eplb := eplbGrid(t, 4, 4)
	for _, tc := range []struct {
		name string
		g    *Grid
		r    int
		be   kernels.Backend
	}{
		{"no replicas", plain, 1, cpu.New(1)},
		{"backend without the op", eplb, 0, hideMasker{cpu.New(1)}},
	} {
		rt, err := tc.g.ReplicaTables(tc.r, tc.be)
		if err != nil || rt != nil {
			t.Errorf("%s: tables %v, err %v; want none", tc.name, rt, err)
		}
		rc := tc.g.comm(tc.r, nil, nil)
		rt.Attach(rc) // nil tables: the host path
		if _, ok := rc.Replicas.(model.DeviceReplicaMask); ok {
			t.Errorf("%s: nil tables attached a device mask", tc.name)
		}
		rt.Free()
	}
	if _, err := eplb.ReplicaTables(4, cpu.New(1)); err == nil || !strings.Contains(err.Error(), "rank 4 of 4") {
		t.Errorf("rank 4 of 4: err %v", err)
	}
}

// hideMasker hides the CPU backend's kernels.ReplicaMasker.
type hideMasker struct{ kernels.Backend }

// TestReplicaTablesAttach: the rank's RankComm, with its tables attached,
// is a model.DeviceReplicaMask whose tables are the rank's, and still the
// grid's mask on the host.
func TestReplicaTablesAttach(t *testing.T) {
	g := eplbGrid(t, 4, 4)
	be := cpu.New(1)
	rt, err := g.ReplicaTables(0, be)
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Free()
	rc := g.comm(0, nil, nil)
	rt.Attach(rc)
	dm, ok := rc.Replicas.(model.DeviceReplicaMask)
	if !ok {
		t.Fatalf("attached mask is %T", rc.Replicas)
	}
	for l := 0; l < g.Cfg.NumHiddenLayers; l++ {
		if dm.Table(l) != rt.Table(l) {
			t.Errorf("layer %d: attached table differs", l)
		}
	}
	host := replicaMask{g, 0}
	for tok := 0; tok < 8; tok++ {
		if dm.Serves(1, tok, 0) != host.Serves(1, tok, 0) || dm.Replicated(2) != host.Replicated(2) {
			t.Fatalf("token %d: attached mask disagrees with the grid's", tok)
		}
	}
}

func TestGridRefusesDuplicateReplica(t *testing.T) {
	c := tinyConfig(t)
	gpus := [][]int{{0, 1, 2, 3, 4, 5, 6, 7, 3}, {8, 9, 10, 11, 12, 13, 14, 15}}
	_, err := NewGrid(c, 0, c.NumHiddenLayers, 2, 2, 2, []topology.LayerExperts{{Layer: 1, GPUs: gpus}})
	if err == nil || !strings.Contains(err.Error(), "expert 3 twice on GPU 0") {
		t.Fatalf("err %v", fmt.Sprint(err))
	}
}

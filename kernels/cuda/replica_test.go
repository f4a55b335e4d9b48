package cuda

import (
	"fmt"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
)

// TestMaskReplicasTwin compares mask_replicas with the CPU twin on random
// tables (replica counts 0..4, this rank's index -1..n-1, including ids
// outside the table) at decode and prefill sizes, and checks that a graph
// captures it: the replay masks new weights with no host copy.
func TestMaskReplicasTwin(t *testing.T) {
	p := newPair(t)
	for _, c := range []struct{ T, k, E int }{{1, 8, 128}, {16, 8, 160}, {67, 6, 40}, {2048, 8, 160}} {
		t.Run(fmt.Sprintf("T%d_k%d_E%d", c.T, c.k, c.E), func(t *testing.T) {
			p := p.sub(t)
			ids, tab := p.replicaInputs(c.T, c.k, c.E)
			wts := p.f32(1, c.T, c.k)
			must(t, "mask replicas", p.cpu.MaskReplicas(wts.c, ids.c, tab.c), p.gpu.MaskReplicas(wts.g, ids.g, tab.g))
			p.check("masked weights", wts, 0)
		})
	}
}

// replicaInputs makes random routes (about 1 in 20 outside [0, E)) and a
// random replica table.
func (p *pairT) replicaInputs(T, k, E int) (ids, tab twin) {
	iv := make([]int32, T*k)
	for i := range iv {
		iv[i] = int32(p.rng.IntN(E))
		if p.rng.IntN(20) == 0 {
			iv[i] = int32(p.rng.IntN(3*E) - E)
		}
	}
	tv := make([]int32, 2*E)
	for e := 0; e < E; e++ {
		n := p.rng.IntN(5)
		tv[2*e], tv[2*e+1] = int32(n), int32(p.rng.IntN(n+1)-1)
	}
	return p.i32(iv, T, k), p.i32(tv, E, 2)
}

func TestMaskReplicasGraph(t *testing.T) {
	p := newPair(t)
	const T, k, E = 16, 8, 160
	ids, tab := p.replicaInputs(T, k, E)
	wts := p.f32(1, T, k)
	must(t, "warm-up", p.gpu.MaskReplicas(wts.g, ids.g, tab.g))
	must(t, "begin", p.gpu.BeginCapture())
	must(t, "capture", p.gpu.MaskReplicas(wts.g, ids.g, tab.g))
	g, err := p.gpu.EndCapture()
	must(t, "end", err)
	defer g.Close()
	// The replay must mask the weights as they are at replay time.
	fresh := p.randF32(T*k, 1)
	must(t, "upload", p.cpu.Upload(wts.c, f32Bytes(fresh)), p.gpu.Upload(wts.g, f32Bytes(fresh)))
	must(t, "mask", p.cpu.MaskReplicas(wts.c, ids.c, tab.c), g.Launch())
	p.check("replayed mask", wts, 0)
}

func TestMaskReplicasRejectsBadShapes(t *testing.T) {
	p := newPair(t)
	ids, tab := p.replicaInputs(4, 2, 8)
	wts := p.f32(1, 4, 3)
	if err := p.gpu.MaskReplicas(wts.g, ids.g, tab.g); err == nil {
		t.Fatal("weights [4,3] with ids [4,2]: no error")
	}
	flat := p.i32(make([]int32, 16), 16)
	if err := p.gpu.MaskReplicas(p.f32(1, 4, 2).g, ids.g, flat.g); err == nil {
		t.Fatal("flat table: no error")
	}
	var _ kernels.ReplicaMasker = p.gpu
}

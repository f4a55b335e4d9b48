package cpu

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
)

// replicaCase is a placement of E experts over groups (holders[e]: the
// groups holding e, in placement order) seen from one group.
type replicaCase struct {
	name    string
	holders func(r *rand.Rand, e int) []int
	groups  int
	group   int
	badIDs  bool // route to ids outside [0, E) too
}

func TestMaskReplicasMatchesPlacement(t *testing.T) {
	const E, T, k = 24, 37, 5
	cases := []replicaCase{
		{name: "held alone (n=1)", groups: 4, group: 1, holders: func(_ *rand.Rand, e int) []int { return []int{e % 4} }},
		{name: "not held (m=-1)", groups: 4, group: 3, holders: func(_ *rand.Rand, e int) []int { return []int{0, 1, 2} }},
		{name: "every expert on every group", groups: 3, group: 2, holders: func(_ *rand.Rand, e int) []int { return []int{(e + 2) % 3, e % 3, (e + 1) % 3} }},
		{name: "random replicas", groups: 4, group: 0, holders: randomHolders(4)},
		{name: "random replicas, ids out of range", groups: 5, group: 2, holders: randomHolders(5), badIDs: true},
	}
	b := New(2)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := rand.New(rand.NewPCG(7, uint64(len(c.name))))
			holders := make([][]int, E)
			for e := range holders {
				holders[e] = c.holders(r, e)
			}
			ids := make([]int32, T*k)
			for i := range ids {
				ids[i] = int32(r.IntN(E))
				if c.badIDs && i%7 == 0 {
					ids[i] = []int32{-1, E, E + 100}[i%3]
				}
			}
			w := randVec(r, T*k)
			wt := tensor(t, b, w, T, k)
			it := i32Tensor(t, b, ids, T, k)
			tab := i32Tensor(t, b, replicaTable(holders, c.group), E, 2)
			if err := b.MaskReplicas(wt, it, tab); err != nil {
				t.Fatal(err)
			}
			got, _ := b.Download(wt)
			masked := 0
			for i, e := range ids {
				want := w[i]
				if e >= 0 && int(e) < E && !servedHere(holders[e], c.group, i/k) {
					want = 0
				}
				if got[i] != want {
					t.Fatalf("route %d (token %d, expert %d of holders %v, group %d): weight %v, want %v", i, i/k, e, holders[min(max(e, 0), E-1)], c.group, got[i], want)
				}
				if want == 0 {
					masked++
				}
			}
			t.Logf("%d of %d routes masked", masked, len(ids))
		})
	}
}

// servedHere is the placement's rule, stated directly: a route is kept
// unless group holds the expert among several replicas and the token's
// replica (token mod replicas, in placement order) is another group's.
func servedHere(holders []int, group, token int) bool {
	if len(holders) <= 1 || !slices.Contains(holders, group) {
		return true
	}
	return holders[token%len(holders)] == group
}

// randomHolders places each expert on 1..groups distinct groups in random order.
func randomHolders(groups int) func(r *rand.Rand, e int) []int {
	return func(r *rand.Rand, _ int) []int {
		return r.Perm(groups)[:1+r.IntN(groups)]
	}
}

// replicaTable is the [E, 2] table of (replicas, group's index or -1).
func replicaTable(holders [][]int, group int) []int32 {
	tab := make([]int32, 0, 2*len(holders))
	for _, h := range holders {
		tab = append(tab, int32(len(h)), int32(slices.Index(h, group)))
	}
	return tab
}

func i32Tensor(t *testing.T, b *Backend, v []int32, shape ...int) *kernels.Tensor {
	t.Helper()
	x, err := b.NewTensor(kernels.I32, shape...)
	if err != nil {
		t.Fatal(err)
	}
	raw := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(raw[4*i:], uint32(x))
	}
	if err := b.Upload(x, raw); err != nil {
		t.Fatal(err)
	}
	return x
}

func TestMaskReplicasRejectsBadShapes(t *testing.T) {
	b := New(1)
	mk := func(dt kernels.DType, shape ...int) *kernels.Tensor {
		x, err := b.NewTensor(dt, shape...)
		if err != nil {
			t.Fatal(err)
		}
		return x
	}
	for _, c := range []struct {
		name             string
		weights, ids, tb *kernels.Tensor
	}{
		{"ids shorter", mk(kernels.F32, 4, 2), mk(kernels.I32, 3, 2), mk(kernels.I32, 8, 2)},
		{"table not [E,2]", mk(kernels.F32, 4, 2), mk(kernels.I32, 4, 2), mk(kernels.I32, 8, 3)},
		{"weights i32", mk(kernels.I32, 4, 2), mk(kernels.I32, 4, 2), mk(kernels.I32, 8, 2)},
		{"flat ids", mk(kernels.F32, 8), mk(kernels.I32, 8), mk(kernels.I32, 8, 2)},
		{"nil table", mk(kernels.F32, 4, 2), mk(kernels.I32, 4, 2), nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := b.MaskReplicas(c.weights, c.ids, c.tb)
			if err == nil {
				t.Fatal("no error")
			}
			t.Log(fmt.Sprint(err))
		})
	}
}

package tp

import (
	"encoding/binary"
	"fmt"
	"slices"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
)

// ReplicaTables are one rank's EPLB replica tables on its backend, one per
// MoE layer where the rank holds an expert that other EP groups also hold
// (kernels.ReplicaMasker's [E, 2] layout: replicas, this rank's replica
// index or -1). They are uploaded once when the rank opens, so that the
// steps mask routes with one kernel on the rank's stream instead of a host
// round trip per layer (which a decode graph cannot capture).
type ReplicaTables struct {
	be     kernels.Backend
	tables map[int]*kernels.Tensor // by layer
}

// ReplicaTables uploads rank r's tables to be. It returns nil (no tables:
// the host path masks, if anything needs masking) when r holds no
// replicated expert or be is not a kernels.ReplicaMasker.
func (g *Grid) ReplicaTables(r int, be kernels.Backend) (*ReplicaTables, error) {
	if r < 0 || r >= g.Ranks {
		return nil, fmt.Errorf("replica tables: rank %d of %d", r, g.Ranks)
	}
	if _, ok := be.(kernels.ReplicaMasker); !ok {
		return nil, nil
	}
	m := replicaMask{g: g, group: g.Group(r)}
	rt := &ReplicaTables{be: be, tables: map[int]*kernels.Tensor{}}
	for l := g.First; l < g.End; l++ {
		if !m.Replicated(l) {
			continue
		}
		t, err := uploadTable(be, m.table(l))
		if err != nil {
			rt.Free()
			return nil, fmt.Errorf("replica tables: rank %d, layer %d: %w", r, l, err)
		}
		rt.tables[l] = t
	}
	if len(rt.tables) == 0 {
		return nil, nil
	}
	return rt, nil
}

// uploadTable makes an I32 [E, 2] tensor of v on be.
func uploadTable(be kernels.Backend, v []int32) (*kernels.Tensor, error) {
	t, err := be.NewTensor(kernels.I32, len(v)/2, 2)
	if err != nil {
		return nil, err
	}
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], uint32(x))
	}
	if err := be.Upload(t, b); err != nil {
		be.Free(t)
		return nil, err
	}
	return t, nil
}

// Table is layer's table; nil for a layer without one (and on nil tables).
func (rt *ReplicaTables) Table(layer int) *kernels.Tensor {
	if rt == nil {
		return nil
	}
	return rt.tables[layer]
}

// Layers is how many layers have a table.
func (rt *ReplicaTables) Layers() int {
	if rt == nil {
		return 0
	}
	return len(rt.tables)
}

// Free frees the tables (nothing on nil); call it before closing the backend.
func (rt *ReplicaTables) Free() {
	if rt == nil {
		return
	}
	for _, t := range rt.tables {
		rt.be.Free(t)
	}
	rt.tables = nil
}

// Attach makes rc's replica mask (the grid's, from Grid.comm) consult rt's
// device tables: model.Forward then masks with the backend's
// kernels.ReplicaMasker. Nothing on nil tables or another mask.
func (rt *ReplicaTables) Attach(rc *model.RankComm) {
	if rt == nil || rc == nil {
		return
	}
	if m, ok := rc.Replicas.(replicaMask); ok {
		rc.Replicas = tabledMask{m, rt}
	}
}

// tabledMask is a rank's replicaMask with its device tables: a
// model.DeviceReplicaMask.
type tabledMask struct {
	replicaMask
	tables *ReplicaTables
}

// Table is model.DeviceReplicaMask's: layer's device table.
func (m tabledMask) Table(l int) *kernels.Tensor { return m.tables.Table(l) }

var _ model.DeviceReplicaMask = tabledMask{}

// table is layer l's [E, 2] entries for m's group: each expert's replica
// count and the group's index among its holders, -1 where it holds none.
func (m replicaMask) table(l int) []int32 {
	hs := m.g.holders[l]
	v := make([]int32, 0, 2*len(hs))
	for _, h := range hs {
		v = append(v, int32(len(h)), int32(slices.Index(h, m.group)))
	}
	return v
}

package node

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"sort"
	"strings"
)

// ModelRef names the model every host must serve. ConfigHash is the sha256 of
// the canonical config bytes; hosts with different hashes are never planned
// together.
type ModelRef struct {
	Ref        string `json:"ref" yaml:"ref" msgpack:"ref"`
	ConfigHash string `json:"config_hash" yaml:"config_hash" msgpack:"config_hash"`
}

// MemberInventory is one cluster member as the planner sees it.
type MemberInventory struct {
	ID        string        `json:"id" yaml:"id" msgpack:"id"`
	Name      string        `json:"name" yaml:"name" msgpack:"name"`
	Addrs     []string      `json:"addrs,omitempty" yaml:"addrs,omitempty" msgpack:"addrs"`
	Inventory HostInventory `json:"inventory" yaml:"inventory" msgpack:"inventory"`
	// DataAddr is where the member's pipeline stage accepts its ring link.
	DataAddr string `json:"data_addr,omitempty" yaml:"data_addr,omitempty" msgpack:"data_addr,omitempty"`
}

// Neighbor is a pipeline neighbour of a stage: its host and the libp2p
// addresses it advertised.
type Neighbor struct {
	HostID string   `json:"host_id" yaml:"host_id" msgpack:"host_id"`
	Name   string   `json:"name" yaml:"name" msgpack:"name"`
	Addrs  []string `json:"addrs,omitempty" yaml:"addrs,omitempty" msgpack:"addrs"`
	// DataAddr is the neighbour's pipeline ring endpoint (host:port).
	DataAddr string `json:"data_addr,omitempty" yaml:"data_addr,omitempty" msgpack:"data_addr,omitempty"`
}

// StageAssignment is what one host runs under a plan.
type StageAssignment struct {
	HostID string `json:"host_id" yaml:"host_id" msgpack:"host_id"`
	Name   string `json:"name" yaml:"name" msgpack:"name"`
	Stage  int    `json:"stage" yaml:"stage" msgpack:"stage"`
	// Layers is the half-open range [Layers[0], Layers[1]).
	Layers [2]int `json:"layers" yaml:"layers" msgpack:"layers"`
	// Experts lists the routed experts this host holds; empty with
	// ExpertSummary set means the summary describes them (e.g. "all").
	Experts       []int     `json:"experts,omitempty" yaml:"experts,omitempty" msgpack:"experts"`
	ExpertSummary string    `json:"expert_summary,omitempty" yaml:"expert_summary,omitempty" msgpack:"expert_summary"`
	Prev          *Neighbor `json:"prev,omitempty" yaml:"prev,omitempty" msgpack:"prev"`
	Next          *Neighbor `json:"next,omitempty" yaml:"next,omitempty" msgpack:"next"`
	// GPUs, TP and EP are the stage's layout on its host as the topology
	// planner sized it: the GPUs it holds, the tensor-parallel size of
	// attention and the dense MLP, and the expert-parallel degree of the
	// routed experts (1: split by TP). Empty in CPU plans.
	GPUs []int `json:"gpus,omitempty" yaml:"gpus,omitempty" msgpack:"gpus"`
	TP   int   `json:"tp,omitempty" yaml:"tp,omitempty" msgpack:"tp"`
	EP   int   `json:"ep,omitempty" yaml:"ep,omitempty" msgpack:"ep"`
}

// ClusterPlan is a placement of the model over the members. Epoch is set by
// the coordinator, not the planner: it increases with every plan the cluster
// agrees on.
type ClusterPlan struct {
	Epoch       uint64            `json:"epoch" yaml:"epoch" msgpack:"epoch"`
	Coordinator string            `json:"coordinator" yaml:"coordinator" msgpack:"coordinator"`
	Model       ModelRef          `json:"model" yaml:"model" msgpack:"model"`
	Stages      []StageAssignment `json:"stages" yaml:"stages" msgpack:"stages"`
	Summary     string            `json:"summary" yaml:"summary" msgpack:"summary"`
}

// Planner places a model on a set of members.
type Planner interface {
	Plan(ctx context.Context, model ModelRef, members []MemberInventory) (*ClusterPlan, error)
}

// MemberIDs returns the sorted host ids the plan assigns stages to.
func (p *ClusterPlan) MemberIDs() []string {
	ids := make([]string, 0, len(p.Stages))
	for _, s := range p.Stages {
		ids = append(ids, s.HostID)
	}
	sort.Strings(ids)
	return ids
}

// Assignment returns the stage of host id.
func (p *ClusterPlan) Assignment(id string) (StageAssignment, bool) {
	for _, s := range p.Stages {
		if s.HostID == id {
			return s, true
		}
	}
	return StageAssignment{}, false
}

// EvenSplitPlanner is the fallback planner used until the topology planner is
// wired: one pipeline stage per member, members ordered by id, layers split as
// evenly as possible (earlier stages take the remainder), every stage holding
// all routed experts of its layers. It ignores the hardware.
//
// With LayerBytes set it also checks memory: each member must hold its
// layers' weights (and the head's HeadBytes on stage 0) in its GPUs'
// memory, or its host memory without GPUs; a member whose inventory shows
// no memory is not checked. A split that does not fit is an error, which
// is how survivors of a lost host learn that they cannot hold the model.
type EvenSplitPlanner struct {
	NumLayers  int // decoder layers to place (GLM-4.5: 92)
	NumExperts int // routed experts per MoE layer, for the summary (GLM-4.5: 160)
	// LayerBytes[i] is decoder layer i's weights; nil: no memory check.
	LayerBytes []int64
	// HeadBytes is what only the head holds: embedding, final norm,
	// lm_head, MTP layer.
	HeadBytes int64
}

// Plan implements Planner.
func (e EvenSplitPlanner) Plan(_ context.Context, model ModelRef, members []MemberInventory) (*ClusterPlan, error) {
	if len(members) == 0 {
		return nil, fmt.Errorf("even split: no members")
	}
	if e.NumLayers < len(members) {
		return nil, fmt.Errorf("even split: %d layers cannot be split over %d hosts", e.NumLayers, len(members))
	}
	if e.LayerBytes != nil && len(e.LayerBytes) != e.NumLayers {
		return nil, fmt.Errorf("even split: %d layer sizes for %d layers", len(e.LayerBytes), e.NumLayers)
	}
	sorted := append([]MemberInventory(nil), members...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].ID < sorted[j].ID })
	per, extra := e.NumLayers/len(sorted), e.NumLayers%len(sorted)
	plan := &ClusterPlan{Model: model}
	first := 0
	for i, m := range sorted {
		n := per
		if i < extra {
			n++
		}
		st := StageAssignment{HostID: m.ID, Name: m.Name, Stage: i, Layers: [2]int{first, first + n}}
		if e.NumExperts > 0 {
			st.ExpertSummary = fmt.Sprintf("all %d experts", e.NumExperts)
		}
		plan.Stages = append(plan.Stages, st)
		first += n
	}
	if err := e.checkMemory(plan, sorted); err != nil {
		return nil, err
	}
	plan.Summary = fmt.Sprintf("even split: %d layers over %d pipeline stages (fallback planner)", e.NumLayers, len(sorted))
	return plan, nil
}

// checkMemory refuses a plan whose stage's weights exceed its host's
// memory (LayerBytes nil: no check).
func (e EvenSplitPlanner) checkMemory(plan *ClusterPlan, members []MemberInventory) error {
	if e.LayerBytes == nil {
		return nil
	}
	var short []string
	for i, st := range plan.Stages {
		var need int64
		for l := st.Layers[0]; l < st.Layers[1]; l++ {
			need += e.LayerBytes[l]
		}
		if st.Stage == 0 {
			need += e.HeadBytes
		}
		if have := memberMemory(members[i].Inventory); have > 0 && need > have {
			short = append(short, fmt.Sprintf("%s needs %s for layers [%d,%d) and has %s",
				st.Name, humanBytes(uint64(need)), st.Layers[0], st.Layers[1], humanBytes(uint64(have))))
		}
	}
	if len(short) > 0 {
		return fmt.Errorf("even split over %d hosts does not fit: %s", len(plan.Stages), strings.Join(short, "; "))
	}
	return nil
}

// memberMemory is where a member holds weights: its GPUs' memory, or its
// host memory without GPUs; 0 if the inventory does not say.
func memberMemory(inv HostInventory) int64 {
	if len(inv.GPUs) == 0 {
		return int64(inv.MemoryBytes)
	}
	var n int64
	for _, g := range inv.GPUs {
		n += int64(g.MemoryBytes)
	}
	return n
}

// fillNeighbors sets Prev/Next of each stage (ordered by Stage) that the
// planner left empty, from the members' advertised addresses.
func fillNeighbors(plan *ClusterPlan, members []MemberInventory) {
	byID := make(map[string]MemberInventory, len(members))
	for _, m := range members {
		byID[m.ID] = m
	}
	idx := make([]int, len(plan.Stages))
	for i := range idx {
		idx[i] = i
	}
	sort.SliceStable(idx, func(a, b int) bool { return plan.Stages[idx[a]].Stage < plan.Stages[idx[b]].Stage })
	nb := func(i int) *Neighbor {
		m := byID[plan.Stages[i].HostID]
		return &Neighbor{HostID: m.ID, Name: m.Name, Addrs: m.Addrs, DataAddr: m.DataAddr}
	}
	for k, i := range idx {
		st := &plan.Stages[i]
		if st.Prev == nil && k > 0 {
			st.Prev = nb(idx[k-1])
		}
		if st.Next == nil && k < len(idx)-1 {
			st.Next = nb(idx[k+1])
		}
	}
}

// validatePlan checks that a plan covers exactly the given members once each.
func validatePlan(plan *ClusterPlan, members []string) error {
	if plan == nil {
		return fmt.Errorf("planner returned no plan")
	}
	got := plan.MemberIDs()
	if len(got) != len(members) {
		return fmt.Errorf("plan has %d stages for %d members", len(got), len(members))
	}
	for i := range got {
		if got[i] != members[i] {
			return fmt.Errorf("plan assigns host %s, which is not a member (members %v)", got[i], members)
		}
	}
	return nil
}

// HashModelRef is the fallback model resolver: the sha256 of the reference
// string itself. Hosts given the same --model string agree; it does not look
// at the model's files. The lead wires model.Resolve in its place.
func HashModelRef(ref string) (string, error) {
	if ref == "" {
		return "", fmt.Errorf("empty model reference")
	}
	sum := sha256.Sum256([]byte(ref))
	return hex.EncodeToString(sum[:]), nil
}

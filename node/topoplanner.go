package node

import (
	"context"
	"fmt"
	"log/slog"
	"sort"
	"strings"

	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/topology"
)

// TopologyPlanner places the model with the topology planner, from the
// hardware every member detected (or was told through --inventory-override).
// Members without GPUs can only run the CPU engine; a cluster with one gets
// an even layer split instead, and the plan's summary says why.
type TopologyPlanner struct {
	// Resolve turns the model reference into its config (model.Resolve).
	Resolve func(ref string) (*model.Config, error)
	// Request carries the serving settings (max model len, sequences, KV
	// dtype, utilisation); Model and Inventory are filled per plan.
	Request topology.PlanRequest
	Logger  *slog.Logger
}

// Plan implements Planner.
func (p TopologyPlanner) Plan(ctx context.Context, ref ModelRef, members []MemberInventory) (*ClusterPlan, error) {
	if p.Resolve == nil {
		return nil, fmt.Errorf("topology planner: no model resolver")
	}
	cfg, err := p.Resolve(ref.Ref)
	if err != nil {
		return nil, fmt.Errorf("topology planner: %w", err)
	}
	sorted := append([]MemberInventory(nil), members...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].ID < sorted[j].ID })
	var cpuOnly []string
	for _, m := range sorted {
		if len(m.Inventory.GPUs) == 0 {
			cpuOnly = append(cpuOnly, m.Name)
		}
	}
	if len(cpuOnly) > 0 {
		layers, head := weightBytes(cfg)
		plan, err := EvenSplitPlanner{NumLayers: cfg.NumHiddenLayers, NumExperts: cfg.NRoutedExperts,
			LayerBytes: layers, HeadBytes: head}.Plan(ctx, ref, sorted)
		if err != nil {
			return nil, err
		}
		plan.Summary = fmt.Sprintf("even split of %d layers over %d hosts: %s ha%s no GPUs (CPU engine)",
			cfg.NumHiddenLayers, len(sorted), strings.Join(cpuOnly, ", "), map[bool]string{true: "s", false: "ve"}[len(cpuOnly) == 1])
		return plan, nil
	}
	req := p.Request
	req.Model = cfg
	req.ModelName = ref.Ref
	byName := map[string]MemberInventory{}
	for _, m := range sorted {
		h, err := inventoryHost(m)
		if err != nil {
			return nil, err
		}
		if _, dup := byName[h.Name]; dup {
			h.Name = fmt.Sprintf("%s-%s", h.Name, shortID(m.ID))
		}
		byName[h.Name] = m
		req.Inventory.Hosts = append(req.Inventory.Hosts, h)
	}
	res, err := topology.Plan(req)
	if err != nil {
		return nil, fmt.Errorf("topology planner: %w", err)
	}
	if !res.Feasible {
		return nil, fmt.Errorf("topology planner: %s", res.Reason)
	}
	plan := &ClusterPlan{Model: ref, Summary: fmt.Sprintf("%d stages; predicted %.0f decode tokens/s, TPOT %.1f ms; bottleneck: %s",
		len(res.Stages), res.Predicted.DecodeTokensPerS, res.Predicted.TPOTMs, res.Predicted.Bottleneck)}
	for _, st := range res.Stages {
		m, ok := byName[st.Host]
		if !ok {
			return nil, fmt.Errorf("topology planner: stage %d on unknown host %q", st.Index, st.Host)
		}
		sa := StageAssignment{HostID: m.ID, Name: m.Name, Stage: st.Index, Layers: st.Layers,
			GPUs: append([]int(nil), st.GPUs...), TP: st.TP, EP: st.EP}
		sa.ExpertSummary = fmt.Sprintf("GPUs %v, TP%d, EP%d", st.GPUs, st.TP, st.EP)
		if st.MTP {
			sa.ExpertSummary += ", MTP layer"
		}
		plan.Stages = append(plan.Stages, sa)
	}
	return plan, nil
}

// weightBytes is the checkpoint's size of each decoder layer and of what
// only the head holds (the embedding, final norm, lm_head and MTP layer):
// what a CPU stage must at least hold in memory.
func weightBytes(cfg *model.Config) ([]int64, int64) {
	layers := make([]int64, cfg.NumHiddenLayers)
	var head int64
	for _, t := range cfg.Tensors() {
		if t.Layer >= 0 && t.Layer < cfg.NumHiddenLayers && t.Role != model.RoleMTP {
			layers[t.Layer] += t.Bytes()
		} else {
			head += t.Bytes()
		}
	}
	return layers, head
}

// inventoryHost describes a member's hardware the way the planner's inventory does.
func inventoryHost(m MemberInventory) (topology.Host, error) {
	inv := m.Inventory
	g := inv.GPUs[0]
	model, err := topology.GPUFromDeviceName(g.Name, g.MemoryBytes)
	if err != nil {
		return topology.Host{}, fmt.Errorf("host %s: %w", m.Name, err)
	}
	h := topology.Host{Name: m.Name, GPU: model, GPUs: len(inv.GPUs), GPUMemory: topology.ByteSize(g.MemoryBytes),
		Interconnect: topology.InterconnectPCIe}
	for _, x := range inv.GPUs {
		if x.NVLinks > 0 {
			h.Interconnect = topology.InterconnectNVLink
		}
	}
	for _, n := range inv.RDMA {
		if n.State == "" || strings.Contains(strings.ToUpper(n.State), "ACTIVE") {
			h.NICs = append(h.NICs, topology.NIC{Name: n.Netdev, RDMA: true, Gbps: n.RateGbps})
		}
	}
	if h.Name == "" {
		h.Name = shortID(m.ID)
	}
	return h, nil
}

package node

import (
	"context"
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/model"
)

func gpuMember(id, name, gpu string, n int, mem uint64, nvlinks int) MemberInventory {
	inv := HostInventory{Hostname: name}
	for i := 0; i < n; i++ {
		inv.GPUs = append(inv.GPUs, GPU{Index: i, Name: gpu, MemoryBytes: mem, NVLinks: nvlinks})
	}
	return MemberInventory{ID: id, Name: name, Inventory: inv}
}

func TestTopologyPlannerOnDetectedHardware(t *testing.T) {
	p := TopologyPlanner{Resolve: model.Resolve}
	ref := ModelRef{Ref: "glm-4.5-fp8"}
	const h100 = 81559 << 20 // what NVML reports for an H100 SXM
	members := []MemberInventory{
		gpuMember("12D3KooWB", "gpu-b", "NVIDIA H100 80GB HBM3", 4, h100, 18),
		gpuMember("12D3KooWA", "gpu-a", "NVIDIA H100 80GB HBM3", 4, h100, 18),
	}
	plan, err := p.Plan(context.Background(), ref, members)
	if err != nil {
		t.Fatal(err)
	}
	if len(plan.Stages) != 2 || plan.Stages[0].Layers[0] != 0 || plan.Stages[len(plan.Stages)-1].Layers[1] != 92 {
		t.Fatalf("plan %+v", plan)
	}
	covered := 0
	for _, s := range plan.Stages {
		covered += s.Layers[1] - s.Layers[0]
	}
	if covered != 92 {
		t.Errorf("stages cover %d layers", covered)
	}
	// Each stage carries its layout on its host for the daemon to open:
	// all four GPUs, attention and experts over them.
	for _, s := range plan.Stages {
		if len(s.GPUs) != 4 || s.TP < 1 || s.EP < 1 || s.TP*max(1, 4/s.TP) != 4 {
			t.Errorf("stage %d: GPUs %v, TP %d, EP %d: want the host's four GPUs", s.Stage, s.GPUs, s.TP, s.EP)
		}
	}
	t.Logf("stage layouts: %+v", plan.Stages[0].ExpertSummary)
	// One host of four H100s cannot hold GLM-4.5-FP8: the planner's reason comes through.
	if _, err := p.Plan(context.Background(), ref, members[:1]); err == nil || !strings.Contains(err.Error(), "does not fit") {
		t.Errorf("1x4xH100: err %v", err)
	}
	// CPU-only members get the even split, and the summary says why.
	cpu := []MemberInventory{{ID: "a", Name: "laptop"}, {ID: "b", Name: "desktop"}}
	plan, err = p.Plan(context.Background(), ModelRef{Ref: "tiny"}, cpu)
	if err != nil || len(plan.Stages) != 2 || !strings.Contains(plan.Summary, "no GPUs") {
		t.Errorf("cpu-only plan %+v, %v", plan, err)
	}
	// A GPU the planner does not know is an error naming it, not a silent guess.
	odd := []MemberInventory{gpuMember("x", "gamer", "NVIDIA GeForce RTX 4090", 1, 24<<30, 0)}
	if _, err := p.Plan(context.Background(), ref, odd); err == nil || !strings.Contains(err.Error(), "RTX 4090") {
		t.Errorf("unknown GPU: err %v", err)
	}
}

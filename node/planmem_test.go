package node

import (
	"context"
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/model"
)

// TestEvenSplitMemoryCheck: with layer sizes the even split refuses a
// split whose stage outgrows its host, naming it; GPU hosts count their
// GPUs' memory, hosts without a memory figure are not checked.
func TestEvenSplitMemoryCheck(t *testing.T) {
	cpu := func(id string, mem uint64) MemberInventory {
		return MemberInventory{ID: id, Name: id, Inventory: HostInventory{MemoryBytes: mem}}
	}
	layers := []int64{gib, gib, gib, gib}
	gpuHost := gpuMember("a", "a", "NVIDIA H100 80GB HBM3", 2, gib, 0)
	gpuHost.Inventory.MemoryBytes = 1 // its two GPUs hold its 2 GiB, not its host memory
	for _, c := range []struct {
		name    string
		head    int64
		members []MemberInventory
		wantErr string
	}{
		{"fits exactly", 0, []MemberInventory{cpu("a", 2*gib), cpu("b", 2*gib)}, ""},
		{"one host short", 0, []MemberInventory{cpu("a", 2*gib), cpu("b", 2*gib-1)}, "b needs 2.0 GiB for layers [2,4) and has 2.0 GiB"},
		{"the head's extra weights", gib / 2, []MemberInventory{cpu("a", 2*gib), cpu("b", 2*gib)}, "a needs 2.5 GiB for layers [0,2)"},
		{"survivor alone", 0, []MemberInventory{cpu("a", 3*gib)}, "does not fit"},
		{"memory unknown: not checked", 0, []MemberInventory{cpu("a", 0)}, ""},
		{"GPU memory, not host memory", 0, []MemberInventory{gpuHost, cpu("b", 2*gib)}, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := EvenSplitPlanner{NumLayers: 4, LayerBytes: layers, HeadBytes: c.head}.Plan(context.Background(), ModelRef{}, c.members)
			if (c.wantErr == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), c.wantErr)) {
				t.Errorf("err %v, want %q", err, c.wantErr)
			}
		})
	}
	if _, err := (EvenSplitPlanner{NumLayers: 4, LayerBytes: layers[:3]}).Plan(context.Background(), ModelRef{}, []MemberInventory{cpu("a", 0)}); err == nil {
		t.Error("3 layer sizes for 4 layers accepted")
	}
}

// TestTopologyPlannerCPUMemory: CPU hosts get the even split checked
// against the checkpoint's sizes: the tiny model fits a laptop, not a host
// of 1 MiB.
func TestTopologyPlannerCPUMemory(t *testing.T) {
	p := TopologyPlanner{Resolve: model.Resolve}
	cfg, err := model.Resolve("tiny")
	if err != nil {
		t.Fatal(err)
	}
	layers, head := weightBytes(cfg)
	var total int64
	for _, b := range layers {
		if b <= 0 {
			t.Fatalf("layer sizes %v", layers)
		}
		total += b
	}
	if head <= 0 || total+head <= 0 {
		t.Fatalf("head %d", head)
	}
	host := func(id string, mem uint64) MemberInventory {
		return MemberInventory{ID: id, Name: id, Inventory: HostInventory{MemoryBytes: mem}}
	}
	if _, err := p.Plan(context.Background(), ModelRef{Ref: "tiny"}, []MemberInventory{host("a", 16<<30), host("b", 16<<30)}); err != nil {
		t.Errorf("tiny on two 16 GiB hosts: %v", err)
	}
	if _, err := p.Plan(context.Background(), ModelRef{Ref: "tiny"}, []MemberInventory{host("a", 1<<20)}); err == nil || !strings.Contains(err.Error(), "does not fit") {
		t.Errorf("tiny on 1 MiB: %v", err)
	}
}

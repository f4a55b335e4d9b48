package parallel

import (
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
)

// pathDevice is a fakeDevice whose Linear takes scratch by the step's
// token count, as the CUDA backend's kernels do: a narrow path (up to
// narrowMax tokens) with a little, the path just past it with the most,
// and wide steps with a middling amount, so that the largest step's
// scratch is not the largest scratch.
type pathDevice struct {
	*fakeDevice
	narrowMax int
	scratchOf func(T int) int64
	trims     int
}

func (d *pathDevice) StepPathTokens(experts, topK int) []int { return []int{d.narrowMax} }

func (d *pathDevice) TrimMemory() error { d.trims++; return nil }

func (d *pathDevice) Linear(out, x, w, bias *kernels.Tensor) error {
	s, err := d.NewTensor(kernels.F32, int(d.scratchOf(x.Rows())/4))
	if err != nil {
		return err
	}
	defer d.Free(s)
	return d.fakeDevice.Linear(out, x, w, bias)
}

var (
	_ kernels.StepPaths     = (*pathDevice)(nil)
	_ kernels.MemoryTrimmer = (*pathDevice)(nil)
)

// The profile covers every kernel path, not only the largest step: the
// scratch of the step just past the backend's path threshold, larger than
// the widest step's, is in the plan's activations, a step of that size
// runs after warm-up under the allocator's limit, and the runtime is
// measured with the allocator's cache trimmed.
func TestProfileCoversEveryPath(t *testing.T) {
	const narrowMax, peakScratch = 5, 8 << 20
	scratch := func(T int) int64 {
		switch {
		case T <= narrowMax:
			return 64 << 10
		case T <= 2*narrowMax:
			return peakScratch // e.g. an FP8 weight expanded for a GEMM
		}
		return 1 << 20
	}
	probe := newFakeDevice(1<<40, 0)
	w := tinyWeights(t, probe)
	weights := probe.MemoryStats().Live
	const runtime = 3 << 20
	d := &pathDevice{fakeDevice: newFakeDevice(weights+1<<30, runtime), narrowMax: narrowMax, scratchOf: scratch}
	d.live = weights
	opt := EngineOptions{MaxNumBatchedTokens: 64, MaxNumSeqs: 4, MaxModelLen: 256, GPUMemoryUtilization: 0.5, MemoryReserve: -1,
		EnforceEager: true}
	e, err := NewEngine(d, w, opt)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	p := e.MemoryPlan()
	if got := p.Activations - p.Workspace; got < peakScratch {
		t.Errorf("profiled scratch %d bytes, want at least the %d of a %d-token step (path threshold %d)", got, peakScratch, narrowMax+1, narrowMax)
	}
	if p.Runtime != runtime {
		t.Errorf("runtime %d, want %d", p.Runtime, runtime)
	}
	if d.trims == 0 {
		t.Error("the runtime was measured without trimming the allocator's cache")
	}
	// Under the limit, the step of the largest scratch still runs.
	var s Seq
	res, err := e.Step([]StepInput{{Seq: &s, Tokens: make([]int32, narrowMax+1)}}, false)
	if err != nil {
		t.Fatalf("a %d-token step after warm-up: %v", narrowMax+1, err)
	}
	res.Release()
	e.KV.Release(&s)
}

func TestProfileTokens(t *testing.T) {
	d := &pathDevice{fakeDevice: newFakeDevice(1<<30, 0), narrowMax: 16}
	cfg := tinyWeights(t, d.fakeDevice).Config
	got := profileTokens(d, cfg, 8, 2048, 16)
	want := []int{1, 16, 17, 2048}
	if len(got) != len(want) {
		t.Fatalf("profileTokens = %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("profileTokens = %v, want %v", got, want)
		}
	}
	if got := profileTokens(d.fakeDevice, cfg, 8, 8, 4); len(got) != 3 || got[0] != 1 || got[1] != 4 || got[2] != 8 {
		t.Errorf("profileTokens without StepPaths = %v, want [1 4 8]", got)
	}
}

// A pipeline head holds only the first layers: its profile and warm-up steps
// run over them before any stage is attached (they failed on the GPU with
// "no pipeline stages are attached" once the plan was set before warm-up),
// while a served step without its stages is still refused.
func TestHeadEngineWarmsUpBeforeItsRing(t *testing.T) {
	probe := newFakeDevice(1<<40, 0)
	w := tinyWeights(t, probe)
	w.Layers = w.Layers[:2]
	w.Selection.EndLayer = 2
	d := newFakeDevice(probe.MemoryStats().Live+1<<30, 1<<20)
	d.live = probe.MemoryStats().Live
	opt := EngineOptions{MaxNumBatchedTokens: 64, MaxNumSeqs: 4, MaxModelLen: 256, GPUMemoryUtilization: 0.5, MemoryReserve: -1,
		EnforceEager: true}
	e, err := NewEngine(d, w, opt)
	if err != nil {
		t.Fatalf("head engine of layers [0,2): %v", err)
	}
	defer e.Close()
	if e.MemoryPlan().KVBlocks == 0 {
		t.Fatal("no KV blocks planned: the profile did not run")
	}
	var s Seq
	if _, err := e.Step([]StepInput{{Seq: &s, Tokens: []int32{1, 2, 3}}}, false); err == nil ||
		!strings.Contains(err.Error(), "no pipeline stages are attached") {
		t.Fatalf("a step of a head without its stages: %v, want a refusal", err)
	}
}

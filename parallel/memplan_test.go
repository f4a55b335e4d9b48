package parallel

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/model/modeltest"
	"github.com/glmtopo/glmtopo/topology"
)

// fakeDevice is the CPU backend seen as a GPU of total bytes: it counts
// the bytes and calls of NewTensor, as the CUDA backend's allocator does,
// and implements kernels.MemoryManager over them (runtime bytes held
// outside the allocator, as a CUDA context's). Views pass through.
type fakeDevice struct {
	*cpu.Backend
	total, runtime int64

	mu                sync.Mutex
	live, peak, limit int64
	allocs            int64
	maxStepTokens     int
	sizes             map[*kernels.Tensor]int64
}

func newFakeDevice(total, runtime int64) *fakeDevice {
	return &fakeDevice{Backend: cpu.New(1), total: total, runtime: runtime, sizes: map[*kernels.Tensor]int64{}}
}

func (d *fakeDevice) NewTensor(dt kernels.DType, shape ...int) (*kernels.Tensor, error) {
	t, err := d.Backend.NewTensor(dt, shape...)
	if err != nil {
		return nil, err
	}
	n := int64(t.Elements() * dt.Size())
	d.mu.Lock()
	defer d.mu.Unlock()
	d.allocs++
	if d.limit > 0 && d.live+n > d.limit {
		return nil, fmt.Errorf("fake device: %d bytes past the limit", n)
	}
	d.live += n
	d.peak = max(d.peak, d.live)
	d.sizes[t] = n
	return t, nil
}

func (d *fakeDevice) UploadWeight(dt kernels.DType, shape []int, data []byte) (*kernels.Tensor, error) {
	t, err := d.Backend.UploadWeight(dt, shape, data)
	if err == nil {
		d.mu.Lock()
		d.live += int64(len(data))
		d.mu.Unlock()
	}
	return t, err
}

func (d *fakeDevice) Free(t *kernels.Tensor) {
	d.mu.Lock()
	d.live -= d.sizes[t]
	delete(d.sizes, t)
	d.mu.Unlock()
	d.Backend.Free(t)
}

func (d *fakeDevice) UploadBatch(b *kernels.Batch) (kernels.BatchMeta, error) {
	d.mu.Lock()
	d.maxStepTokens = max(d.maxStepTokens, b.Tokens())
	d.mu.Unlock()
	return d.Backend.UploadBatch(b)
}

func (d *fakeDevice) DeviceMemory() (free, total int64, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.total - d.runtime - d.live, d.total, nil
}

func (d *fakeDevice) MemoryStats() kernels.MemoryStats {
	d.mu.Lock()
	defer d.mu.Unlock()
	return kernels.MemoryStats{Live: d.live, Peak: d.peak, DriverAllocs: d.allocs, Limit: d.limit}
}

func (d *fakeDevice) ResetPeakMemory() { d.mu.Lock(); d.peak = d.live; d.mu.Unlock() }

func (d *fakeDevice) SetMemoryLimit(n int64) { d.mu.Lock(); d.limit = n; d.mu.Unlock() }

var (
	_ kernels.MemoryManager = (*fakeDevice)(nil)
	_ kernels.Viewer        = (*fakeDevice)(nil)
)

func tinyWeights(t *testing.T, be kernels.Backend) *model.Weights {
	t.Helper()
	return modeltest.LoadWeights(t, be, filepath.Join("..", "testdata", "glm4moe", "tiny", "model"))
}

// The step workspace bounds activations: after NewEngine (sizing, profile
// and warm-up) no step allocates a tensor, whether it is a full chunked
// prefill, a mix of prompt chunks and decode tokens, or pure decode, and
// the scheduler never builds a step past --max-num-batched-tokens (decode
// tokens included).
func TestWorkspaceNoAllocationAfterWarmUp(t *testing.T) {
	const batched, seqs = 48, 6
	d := newFakeDevice(1<<40, 0)
	w := tinyWeights(t, d)
	e, err := NewEngine(d, w, EngineOptions{MaxTokens: 4096, MaxNumBatchedTokens: batched, MaxNumSeqs: seqs, MaxModelLen: 512})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	if e.MaxStepTokens() != batched {
		t.Fatalf("workspace sized for %d tokens, want %d", e.MaxStepTokens(), batched)
	}
	before := d.MemoryStats().DriverAllocs
	d.maxStepTokens = 0
	s := NewScheduler(e, SchedulerOptions{MaxNumSeqs: seqs, PrefillTokens: batched})
	defer s.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 2*seqs)
	for i := range 2 * seqs { // twice the slots: admission waits, prompts chunk over several steps
		prompt := make([]int, 20+7*i)
		for j := range prompt {
			prompt[j] = (i*31 + j*7) % e.Cfg.VocabSize
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, res, err := collect(context.Background(), s, Request{PromptIDs: prompt, MaxNewTokens: 9, IgnoreEOS: true})
			if err == nil && res.CompletionTokens != 9 {
				err = fmt.Errorf("request %d: %d tokens", i, res.CompletionTokens)
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := d.MemoryStats().DriverAllocs - before; n != 0 {
		t.Errorf("%d tensors allocated on the step path after warm-up, want 0", n)
	}
	if got := e.DriverAllocsAfterWarmUp(); got != 0 {
		t.Errorf("DriverAllocsAfterWarmUp = %d, want 0", got)
	}
	if d.maxStepTokens > batched || d.maxStepTokens < batched/2 {
		t.Errorf("largest step held %d tokens; want at most --max-num-batched-tokens %d (and chunked prefill filling it)", d.maxStepTokens, batched)
	}
}

// A step larger than the workspace is refused before anything runs, and
// a step of exactly its size runs without allocating.
func TestStepBoundedByWorkspace(t *testing.T) {
	d := newFakeDevice(1<<40, 0)
	e, err := NewEngine(d, tinyWeights(t, d), EngineOptions{MaxTokens: 1024, MaxNumBatchedTokens: 32, MaxNumSeqs: 2})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	seq := &Seq{}
	_, err = e.Step([]StepInput{{Seq: seq, Tokens: make([]int32, 33)}}, false)
	if !errors.Is(err, ErrInvalidRequest) || !strings.Contains(err.Error(), "--max-num-batched-tokens 32") {
		t.Fatalf("33-token step: %v, want ErrInvalidRequest naming --max-num-batched-tokens 32", err)
	}
	if len(seq.Blocks) != 0 {
		t.Fatalf("a refused step reserved %d blocks", len(seq.Blocks))
	}
	before := d.MemoryStats().DriverAllocs
	a, b := &Seq{}, &Seq{}
	res, err := e.Step([]StepInput{{Seq: a, Tokens: make([]int32, 31)}, {Seq: b, Tokens: []int32{5}}}, false)
	if err != nil {
		t.Fatal(err)
	}
	res.Release()
	if n := d.MemoryStats().DriverAllocs - before; n != 0 {
		t.Errorf("a full step allocated %d tensors", n)
	}
}

// The workspace the engine measures (a dry forward of the worst-case
// step) is exactly topology.WorkspaceBytes, the memory model's term that
// `glmtopo plan` budgets for: planner and engine agree on activations.
func TestWorkspaceMatchesMemoryModel(t *testing.T) {
	be := cpu.New(1)
	w := tinyWeights(t, be)
	for _, c := range []struct{ batched, seqs, maxLen int }{{32, 1, 4096}, {256, 8, 4096}, {2048, 64, 4096}, {512, 4, 100}} {
		e, err := NewEngine(be, w, EngineOptions{MaxTokens: 4096, MaxNumBatchedTokens: c.batched, MaxNumSeqs: c.seqs, MaxModelLen: c.maxLen})
		if err != nil {
			t.Fatal(err)
		}
		rows := len(worstCaseLens(c.batched, c.seqs, c.maxLen))
		want := topology.WorkspaceBytes(e.Cfg, topology.StepShape{Tokens: c.batched, Seqs: rows, Head: true})
		if got := e.MemoryPlan().Workspace; got != want {
			t.Errorf("%+v: engine workspace %d bytes, memory model %d", c, got, want)
		}
		e.Close()
	}
}

// Profile, then size: on a device that reports its memory the KV cache
// gets utilization × total − weights − the profiled step's peak − runtime −
// reserve in whole blocks; the allocator is capped at the budget; the
// overrides replace the sizing; what cannot fit fails with a sentence
// naming the flag to change.
func TestProfiledKVSizing(t *testing.T) {
	const runtime, reserve = 3 << 20, 1 << 20
	probe := newFakeDevice(1<<40, 0)
	w := tinyWeights(t, probe)
	weights := probe.MemoryStats().Live
	opt := EngineOptions{MaxNumBatchedTokens: 64, MaxNumSeqs: 4, MaxModelLen: 256, GPUMemoryUtilization: 0.5, MemoryReserve: reserve}
	e0, err := NewEngine(probe, w, EngineOptions{MaxTokens: 16, MaxNumBatchedTokens: 64, MaxNumSeqs: 4, MaxModelLen: 16})
	if err != nil {
		t.Fatal(err)
	}
	ws := e0.MemoryPlan().Workspace
	blockBytes := int64(e0.KV.BlockSize) * int64(len(e0.KV.Layers)) * 2 * int64(w.Config.KVDim()) * 4
	e0.Close()
	want := 300 // KV blocks the budget should leave
	total := 2 * (weights + ws + runtime + reserve + int64(want)*blockBytes + blockBytes/2)

	cases := []struct {
		name       string
		opt        func(*EngineOptions)
		total      int64
		wantBlocks int
		wantErr    string
	}{
		{"profiled", func(*EngineOptions) {}, total, want, ""},
		{"kv-cache-memory-bytes", func(o *EngineOptions) { o.KVCacheMemoryBytes = 40 * blockBytes }, total, 40, ""},
		{"num-gpu-blocks-override", func(o *EngineOptions) { o.NumGPUBlocksOverride = 17 }, total, 17, ""},
		{"no room", func(*EngineOptions) {}, 2 * (weights + ws + runtime), 0, "no room for the KV cache"},
		{"override past the device", func(o *EngineOptions) { o.NumGPUBlocksOverride = int(total / blockBytes) }, total, 0, "lower --num-gpu-blocks-override"},
		{"override below one request", func(o *EngineOptions) { o.NumGPUBlocksOverride = 3 }, total, 0, "fewer than one --max-model-len 256 request"},
		{"batched below seqs", func(o *EngineOptions) { o.MaxNumBatchedTokens = 3 }, total, 0, "--max-num-batched-tokens 3 is smaller than --max-num-seqs 4"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := newFakeDevice(c.total, runtime)
			d.live = weights // the weights are "on" the device: reuse w, count its bytes
			o := opt
			c.opt(&o)
			e, err := NewEngine(d, w, o)
			if c.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), c.wantErr) {
					t.Fatalf("err = %v, want one saying %q", err, c.wantErr)
				}
				if d.live != weights {
					t.Errorf("a failed start left %d bytes allocated", d.live-weights)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer e.Close()
			p := e.MemoryPlan()
			if p.KVBlocks != c.wantBlocks || e.KV.NumBlocks != c.wantBlocks {
				t.Errorf("KV cache %d blocks (pool %d), want %d; plan %+v", p.KVBlocks, e.KV.NumBlocks, c.wantBlocks, p)
			}
			if p.Weights != weights || p.Workspace != ws || p.Runtime != runtime || p.Reserve != reserve || p.Total != c.total {
				t.Errorf("plan %+v: want weights %d, workspace %d, runtime %d, reserve %d, total %d", p, weights, ws, runtime, reserve, c.total)
			}
			if d.peak+runtime > p.Budget() {
				t.Errorf("peak %d + runtime %d passed the budget %d", d.peak, runtime, p.Budget())
			}
			if d.limit == 0 || d.limit > p.Budget()-runtime+1 {
				t.Errorf("allocator limit %d, want the budget less the runtime (%d)", d.limit, p.Budget()-runtime)
			}
			if got := p.MaxConcurrency(); got != float64(p.KVTokens())/256 {
				t.Errorf("max concurrency %g for %d tokens", got, p.KVTokens())
			}
		})
	}
}

// Weights that cannot fit are refused before loading, with what to change.
func TestOpenRefusesWeightsThatDoNotFit(t *testing.T) {
	cfg, err := model.Resolve("tiny")
	if err != nil {
		t.Fatal(err)
	}
	w := weightBytes(cfg)
	for _, c := range []struct {
		total int64
		util  float64
		want  string
	}{{w / 2, 0.9, "do not fit the"}, {w * 105 / 100, 0.9, "exceed the"}} {
		d := newFakeDevice(c.total, 0)
		_, _, err := Open(context.Background(), ModelSource{Path: "tiny", LoadFormat: "dummy"}, d, EngineOptions{GPUMemoryUtilization: c.util}, nil)
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "num_hidden_layers") {
			t.Errorf("total %d: err = %v, want %q and the flag to change", c.total, err, c.want)
		}
		if d.allocs != 0 {
			t.Errorf("total %d: %d tensors allocated before refusing", c.total, d.allocs)
		}
	}
}

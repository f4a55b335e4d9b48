package serve

import (
	"strconv"
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/topology"
)

// plannedGen is a generator that reports the engine's memory plan.
type plannedGen struct {
	*fakeGen
	plan topology.MemoryPlan
}

func (g plannedGen) MemoryPlan() topology.MemoryPlan { return g.plan }
func (plannedGen) DriverAllocsAfterWarmUp() int64    { return 0 }

// The engine's memory plan is on /metrics: bytes by use, the KV cache in
// blocks and tokens, the maximum concurrency at max-model-len.
func TestMemoryPlanMetrics(t *testing.T) {
	p := topology.MemoryPlan{Total: 100 << 30, Utilization: 0.9, Weights: 60 << 30, Activations: 2 << 30, Workspace: 1 << 30,
		Graphs: 1 << 28, Runtime: 1 << 30, Reserve: 1 << 29, BlockSize: 16, KVBlockBytes: 1 << 20, MaxModelLen: 8192,
		MaxNumSeqs: 16, BatchedTokens: 2048, Source: "profiled"}
	if err := p.Size(0, 0); err != nil {
		t.Fatal(err)
	}
	s, _ := newTestServer(t, testConfig(), plannedGen{newFakeGen(scriptText(t, "x")), p})
	m := scrapeMetrics(t, s)
	for _, want := range []string{
		`glmtopo:memory_plan_bytes{model_name="glm-test",use="weights"} 6.442450944e+10`,
		`glmtopo:memory_plan_bytes{model_name="glm-test",use="kv_cache"} `,
		`glmtopo:memory_plan_bytes{model_name="glm-test",use="activations"} 2.147483648e+09`,
		`glmtopo:num_gpu_blocks{model_name="glm-test"} ` + strconv.Itoa(p.KVBlocks),
		`glmtopo:kv_cache_tokens{model_name="glm-test"} ` + strconv.Itoa(p.KVTokens()),
		`glmtopo:max_concurrency{model_name="glm-test"} `,
		`glmtopo:max_num_batched_tokens{model_name="glm-test"} 2048`,
		`glmtopo:device_allocations_after_warmup{model_name="glm-test"} 0`,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

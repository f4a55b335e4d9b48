package serve

import (
	"context"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/parallel"
)

// 200 concurrent streaming chats against the real CPU engine (the tiny
// fixture model behind the continuous-batching scheduler): every one
// completes or gets a clean error, and the engine frees every sequence.
func TestConcurrentStreamsCPUEngine(t *testing.T) {
	dir := filepath.Join("..", "testdata", "glm4moe", "tiny", "model")
	eng, closeEngine, err := parallel.OpenEngine(context.Background(), dir, cpu.New(0), parallel.EngineOptions{MaxTokens: 64 * 1024}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer closeEngine()
	sched := parallel.NewScheduler(eng, parallel.SchedulerOptions{MaxNumSeqs: 64, MaxWaiting: 512})
	completed := runConcurrentStreams(t, sched, 200)
	// The engine reports its KV cache use on /metrics (empty again now).
	_, ts := newTestServer(t, testConfig(), sched)
	resp, err := http.Get(ts.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), `glmtopo:kv_cache_usage_perc{model_name="glm-test"} 0`) {
		t.Errorf("metrics lack the KV cache gauge:\n%.400s", body)
	}
	sched.Close() // one scheduler owns the engine at a time
	if completed != 200 {
		t.Errorf("%d of 200 streams completed (the queue holds them all, so none should be refused)", completed)
	}
	if free := eng.KV.FreeBlocks(); free != eng.KV.NumBlocks {
		t.Errorf("%d of %d KV blocks free after every stream ended", free, eng.KV.NumBlocks)
	}
	// A queue too short for the burst: the rest get clean 503s, never a hang.
	small := parallel.NewScheduler(eng, parallel.SchedulerOptions{MaxNumSeqs: 8, MaxWaiting: 8})
	defer small.Close()
	if n := runConcurrentStreams(t, small, 200); n < 8 || n == 200 {
		t.Errorf("%d of 200 completed with room for 16", n)
	}
}

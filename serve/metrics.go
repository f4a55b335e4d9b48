package serve

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/glmtopo/glmtopo/topology"
)

// metrics are the server's Prometheus metrics, named like vLLM's `vllm:`
// metrics with the prefix `glmtopo:`. They live in the server's own
// registry so several servers (tests) never collide.
type metrics struct {
	registry *prometheus.Registry

	requestSuccess   *prometheus.CounterVec // by finished_reason
	requestErrors    *prometheus.CounterVec // by HTTP status code
	running, waiting prometheus.Gauge
	ttft             prometheus.Histogram
	interToken       prometheus.Histogram
	e2e              prometheus.Histogram
	promptTokens     prometheus.Counter
	generationTokens prometheus.Counter
	promptHist       prometheus.Histogram
	generationHist   prometheus.Histogram
}

func newMetrics(modelName string) *metrics {
	labels := prometheus.Labels{"model_name": modelName}
	latency := []float64{0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640, 2560}
	tokenBuckets := []float64{1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000}
	m := &metrics{registry: prometheus.NewRegistry()}
	m.requestSuccess = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "glmtopo:request_success_total", Help: "Finished requests by finish reason (stop, length, tool_calls, abort).", ConstLabels: labels,
	}, []string{"finished_reason"})
	m.requestErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "glmtopo:request_errors_total", Help: "Requests answered with an error, by HTTP status.", ConstLabels: labels,
	}, []string{"code"})
	m.running = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "glmtopo:num_requests_running", Help: "Requests generating tokens (first token received).", ConstLabels: labels,
	})
	m.waiting = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "glmtopo:num_requests_waiting", Help: "Admitted requests waiting for their first token (queued or in prefill).", ConstLabels: labels,
	})
	m.ttft = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "glmtopo:time_to_first_token_seconds", Help: "Time from request arrival to the first generated token.", ConstLabels: labels, Buckets: latency,
	})
	m.interToken = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "glmtopo:inter_token_latency_seconds", Help: "Time between consecutive generated tokens.", ConstLabels: labels, Buckets: latency,
	})
	m.e2e = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "glmtopo:e2e_request_latency_seconds", Help: "Time from request arrival to its end.", ConstLabels: labels, Buckets: latency,
	})
	m.promptTokens = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "glmtopo:prompt_tokens_total", Help: "Prompt tokens processed.", ConstLabels: labels,
	})
	m.generationTokens = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "glmtopo:generation_tokens_total", Help: "Tokens generated.", ConstLabels: labels,
	})
	m.promptHist = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "glmtopo:request_prompt_tokens", Help: "Prompt tokens per request.", ConstLabels: labels, Buckets: tokenBuckets,
	})
	m.generationHist = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "glmtopo:request_generation_tokens", Help: "Generated tokens per request.", ConstLabels: labels, Buckets: tokenBuckets,
	})
	m.registry.MustRegister(m.requestSuccess, m.requestErrors, m.running, m.waiting, m.ttft, m.interToken, m.e2e,
		m.promptTokens, m.generationTokens, m.promptHist, m.generationHist,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{Registry: m.registry})
}

// kvCacheUser is implemented by engines that report their KV cache use.
type kvCacheUser interface{ KVCacheUsage() float64 }

// watchKVCache exports the engine's KV cache use, like vLLM's kv_cache_usage_perc.
func (m *metrics) watchKVCache(modelName string, usage func() float64) {
	m.registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "glmtopo:kv_cache_usage_perc", Help: "Fraction of the paged KV cache held by sequences (1 = full).",
		ConstLabels: prometheus.Labels{"model_name": modelName},
	}, usage))
}

// memoryPlanner is implemented by engines that sized their memory at start
// (parallel.Scheduler: the engine's topology.MemoryPlan).
type memoryPlanner interface {
	MemoryPlan() topology.MemoryPlan
	DriverAllocsAfterWarmUp() int64
}

// exportMemoryPlan publishes the engine's memory plan as gauges (vLLM logs
// the same figures at start): bytes by use, the KV cache in blocks and
// tokens, and the maximum concurrency at max-model-len.
func (m *metrics) exportMemoryPlan(modelName string, mp memoryPlanner) {
	p := mp.MemoryPlan()
	labels := prometheus.Labels{"model_name": modelName}
	bytes := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "glmtopo:memory_plan_bytes", ConstLabels: labels,
		Help: "The engine's memory plan per GPU at start, by use: total, budget (total × gpu-memory-utilization), weights, activations (a profiled worst-case step), workspace (of which preallocated), graphs, runtime, reserve, kv_cache, planned (all uses).",
	}, []string{"use"})
	for use, v := range map[string]int64{"total": p.Total, "budget": p.Budget(), "weights": p.Weights, "activations": p.Activations,
		"workspace": p.Workspace, "graphs": p.Graphs, "runtime": p.Runtime, "reserve": p.Reserve, "kv_cache": p.KVBytes, "planned": p.Used()} {
		bytes.WithLabelValues(use).Set(float64(v))
	}
	gauge := func(name, help string, v float64) prometheus.Gauge {
		g := prometheus.NewGauge(prometheus.GaugeOpts{Name: name, Help: help, ConstLabels: labels})
		g.Set(v)
		return g
	}
	m.registry.MustRegister(bytes,
		gauge("glmtopo:num_gpu_blocks", "KV cache blocks (vLLM's cache_config_info num_gpu_blocks).", float64(p.KVBlocks)),
		gauge("glmtopo:kv_cache_tokens", "Tokens the KV cache holds.", float64(p.KVTokens())),
		gauge("glmtopo:max_concurrency", "Requests of max-model-len tokens the KV cache holds at once.", p.MaxConcurrency()),
		gauge("glmtopo:max_num_batched_tokens", "Tokens per engine step the step workspace was sized for.", float64(p.BatchedTokens)),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "glmtopo:device_allocations_after_warmup", ConstLabels: labels,
			Help: "Device memory allocations since the engine's warm-up (decode graphs captured on first use add theirs; eager steps none; -1: not counted)."},
			func() float64 { return float64(mp.DriverAllocsAfterWarmUp()) }))
}

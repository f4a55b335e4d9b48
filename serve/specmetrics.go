package serve

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/glmtopo/glmtopo/parallel"
)

// specDecoder is implemented by engines that can speculate (the
// scheduler); ok is false while speculation is off.
type specDecoder interface {
	SpecDecodeStats() (st parallel.SpecDecodeStats, ok bool)
}

// specCollector exports speculative decoding's counters under vLLM's names
// (vllm:spec_decode_num_drafts and so on, counters with the _total suffix)
// with the glmtopo: prefix; `glmtopo bench serve` reads either prefix.
// Nothing is exported while the engine does not speculate.
type specCollector struct {
	stats                                 func() (parallel.SpecDecodeStats, bool)
	drafts, draftTokens, accepted, perPos *prometheus.Desc
}

func newSpecCollector(modelName string, stats func() (parallel.SpecDecodeStats, bool)) *specCollector {
	labels := prometheus.Labels{"model_name": modelName}
	return &specCollector{
		stats: stats,
		drafts: prometheus.NewDesc("glmtopo:spec_decode_num_drafts_total",
			"Verify steps of a sequence that carried drafts.", nil, labels),
		draftTokens: prometheus.NewDesc("glmtopo:spec_decode_num_draft_tokens_total",
			"Draft tokens proposed by the MTP layer.", nil, labels),
		accepted: prometheus.NewDesc("glmtopo:spec_decode_num_accepted_tokens_total",
			"Draft tokens accepted by verification.", nil, labels),
		perPos: prometheus.NewDesc("glmtopo:spec_decode_num_accepted_tokens_per_pos_total",
			"Draft tokens accepted, by position in the draft (0 = first).", []string{"position"}, labels),
	}
}

func (c *specCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.drafts
	ch <- c.draftTokens
	ch <- c.accepted
	ch <- c.perPos
}

func (c *specCollector) Collect(ch chan<- prometheus.Metric) {
	st, ok := c.stats()
	if !ok {
		return
	}
	ch <- prometheus.MustNewConstMetric(c.drafts, prometheus.CounterValue, float64(st.NumDrafts))
	ch <- prometheus.MustNewConstMetric(c.draftTokens, prometheus.CounterValue, float64(st.NumDraftTokens))
	ch <- prometheus.MustNewConstMetric(c.accepted, prometheus.CounterValue, float64(st.NumAcceptedTokens))
	for pos, n := range st.AcceptedPerPos {
		ch <- prometheus.MustNewConstMetric(c.perPos, prometheus.CounterValue, float64(n), strconv.Itoa(pos))
	}
}

// watchSpecDecode registers the speculative decoding counters.
func (m *metrics) watchSpecDecode(modelName string, sd specDecoder) {
	m.registry.MustRegister(newSpecCollector(modelName, sd.SpecDecodeStats))
}

package node

import (
	"fmt"
	"io"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// StageMetrics are one pipeline stage's counters since its plan epoch
// started (a new epoch's stage starts from zero).
type StageMetrics struct {
	// Steps counts the steps that carried hidden rows through the stage;
	// every stage of a healthy ring counts the same.
	Steps int64 `json:"steps" msgpack:"steps"`
	// Tokens sums those steps' rows (prompt chunks and decode tokens).
	Tokens int64 `json:"tokens" msgpack:"tokens"`
	// StepMS is the stage's own compute per step (an executor's layers;
	// the head's embedding, layers, lm_head and sampling), in ms.
	StepMS Quantiles `json:"step_ms" msgpack:"step_ms"`
	BusyS  float64   `json:"busy_s" msgpack:"busy_s"`
	// IdleS is the time the stage waited for its input with nothing to
	// run (the head: for the last stage's answer); IdleFrac is
	// IdleS/(BusyS+IdleS), the share of the stage's time in the bubble.
	IdleS    float64     `json:"idle_s" msgpack:"idle_s"`
	IdleFrac float64     `json:"idle_frac" msgpack:"idle_frac"`
	Link     LinkTraffic `json:"link" msgpack:"link"`
}

// Quantiles of a distribution.
type Quantiles struct {
	P50 float64 `json:"p50" msgpack:"p50"`
	P99 float64 `json:"p99" msgpack:"p99"`
}

// LinkTraffic sums a stage's data-plane links (transport telemetry):
// what it sent downstream and received from upstream.
type LinkTraffic struct {
	TxBytes    uint64 `json:"tx_bytes" msgpack:"tx_bytes"`
	RxBytes    uint64 `json:"rx_bytes" msgpack:"rx_bytes"`
	TxMessages uint64 `json:"tx_messages" msgpack:"tx_messages"`
	RxMessages uint64 `json:"rx_messages" msgpack:"rx_messages"`
}

// NewStageMetrics builds a stage's metrics from its counters and its
// links' (the runtime's reader for StageStates.SetMetrics).
func NewStageMetrics(steps, tokens int64, p50, p99, busy, idle time.Duration, links []LinkStatus) StageMetrics {
	m := StageMetrics{Steps: steps, Tokens: tokens, StepMS: Quantiles{P50: ms(p50), P99: ms(p99)},
		BusyS: busy.Seconds(), IdleS: idle.Seconds()}
	for _, l := range links {
		m.Link.TxBytes += l.BytesSent
		m.Link.RxBytes += l.BytesRecv
		m.Link.TxMessages += l.MsgsSent
		m.Link.RxMessages += l.MsgsRecv
	}
	m.normalize()
	return m
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// normalize derives IdleFrac (a reader may leave it out).
func (m *StageMetrics) normalize() {
	m.IdleFrac = 0
	if t := m.BusyS + m.IdleS; t > 0 {
		m.IdleFrac = m.IdleS / t
	}
}

// stageReport is a member's stage as its heartbeat carries it.
type stageReport struct {
	Epoch   uint64        `msgpack:"epoch"`
	State   string        `msgpack:"state"`
	Reason  string        `msgpack:"reason,omitempty"`
	Metrics *StageMetrics `msgpack:"metrics,omitempty"`
}

// writeStages prints the plan's stages with their counters.
func writeStages(w io.Writer, stages []StageStatus) error {
	if len(stages) == 0 {
		return nil
	}
	fmt.Fprintln(w, "\nstages:")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "STAGE\tHOST\tLAYERS\tSTATE\tSTEPS\tTOKENS\tSTEP P50/P99\tIDLE\tSENT\tRECEIVED")
	for _, s := range stages {
		steps, tokens, step, idle, tx, rx := "-", "-", "-", "-", "-", "-"
		if m := s.StageMetrics; m != nil {
			steps, tokens = strconv.FormatInt(m.Steps, 10), strconv.FormatInt(m.Tokens, 10)
			step = fmt.Sprintf("%.2f/%.2f ms", m.StepMS.P50, m.StepMS.P99)
			idle = fmt.Sprintf("%.0f%%", 100*m.IdleFrac)
			tx = fmt.Sprintf("%s (%d)", trafficBytes(m.Link.TxBytes), m.Link.TxMessages)
			rx = fmt.Sprintf("%s (%d)", trafficBytes(m.Link.RxBytes), m.Link.RxMessages)
		}
		state := s.State
		if s.Reason != "" {
			state += ": " + s.Reason
		}
		fmt.Fprintf(tw, "%d\t%s\t[%d,%d)\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Stage, s.Host, s.Layers[0], s.Layers[1],
			state, steps, tokens, step, idle, tx, rx)
	}
	return tw.Flush()
}

// StageCollector exports the cluster's stages (StageStates.Cluster: every
// stage this daemon knows of, its own and the heartbeat reports) as
// Prometheus metrics, glmtopo:stage_*, labelled by stage and host.
type StageCollector struct{ s *StageStates }

// NewStageCollector wraps s; register it with a prometheus.Registerer.
func NewStageCollector(s *StageStates) *StageCollector { return &StageCollector{s: s} }

var (
	stageLabels    = []string{"stage", "host"}
	descStageReady = prometheus.NewDesc("glmtopo:stage_ready", "1 if the pipeline stage is ready, else 0.", stageLabels, nil)
	descStageSteps = prometheus.NewDesc("glmtopo:stage_steps_total", "Steps with hidden rows the stage ran in this plan epoch.", stageLabels, nil)
	descStageToks  = prometheus.NewDesc("glmtopo:stage_tokens_total", "Token rows the stage ran in this plan epoch.", stageLabels, nil)
	descStageStep  = prometheus.NewDesc("glmtopo:stage_step_ms", "Quantiles of the stage's own compute per step, in ms.", append(stageLabels, "quantile"), nil)
	descStageBusy  = prometheus.NewDesc("glmtopo:stage_busy_seconds_total", "Seconds the stage computed.", stageLabels, nil)
	descStageIdle  = prometheus.NewDesc("glmtopo:stage_idle_seconds_total", "Seconds the stage waited for its input.", stageLabels, nil)
	descStageFrac  = prometheus.NewDesc("glmtopo:stage_idle_fraction", "Idle share of the stage's time (the pipeline bubble).", stageLabels, nil)
	descStageBytes = prometheus.NewDesc("glmtopo:stage_link_bytes_total", "Bytes the stage's data-plane links moved.", append(stageLabels, "direction"), nil)
	descStageMsgs  = prometheus.NewDesc("glmtopo:stage_link_messages_total", "Messages the stage's data-plane links moved.", append(stageLabels, "direction"), nil)
)

// Describe implements prometheus.Collector.
func (c *StageCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descStageReady, descStageSteps, descStageToks, descStageStep, descStageBusy,
		descStageIdle, descStageFrac, descStageBytes, descStageMsgs} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *StageCollector) Collect(ch chan<- prometheus.Metric) {
	for _, s := range c.s.Cluster() {
		lv := []string{strconv.Itoa(s.Stage), s.Host}
		put := func(d *prometheus.Desc, t prometheus.ValueType, v float64, extra ...string) {
			ch <- prometheus.MustNewConstMetric(d, t, v, append(lv, extra...)...)
		}
		ready := 0.0
		if s.State == StageReady {
			ready = 1
		}
		put(descStageReady, prometheus.GaugeValue, ready)
		m := s.StageMetrics
		if m == nil {
			continue
		}
		put(descStageSteps, prometheus.CounterValue, float64(m.Steps))
		put(descStageToks, prometheus.CounterValue, float64(m.Tokens))
		put(descStageStep, prometheus.GaugeValue, m.StepMS.P50, "0.5")
		put(descStageStep, prometheus.GaugeValue, m.StepMS.P99, "0.99")
		put(descStageBusy, prometheus.CounterValue, m.BusyS)
		put(descStageIdle, prometheus.CounterValue, m.IdleS)
		put(descStageFrac, prometheus.GaugeValue, m.IdleFrac)
		put(descStageBytes, prometheus.CounterValue, float64(m.Link.TxBytes), "send")
		put(descStageBytes, prometheus.CounterValue, float64(m.Link.RxBytes), "recv")
		put(descStageMsgs, prometheus.CounterValue, float64(m.Link.TxMessages), "send")
		put(descStageMsgs, prometheus.CounterValue, float64(m.Link.RxMessages), "recv")
	}
}

package telemetry

import "github.com/prometheus/client_golang/prometheus"

// Collector exports a registry's links as Prometheus metrics
// (glmtopo:transport_*), labelled by link kind and peer.
type Collector struct{ r *Registry }

// NewCollector wraps r; register it with a prometheus.Registerer.
func NewCollector(r *Registry) *Collector { return &Collector{r: r} }

var (
	labels      = []string{"link", "peer"}
	descBytes   = prometheus.NewDesc("glmtopo:transport_bytes_total", "Payload and header bytes moved by a link.", append(labels, "direction"), nil)
	descMsgs    = prometheus.NewDesc("glmtopo:transport_messages_total", "Messages moved by a link.", append(labels, "direction"), nil)
	descLatency = prometheus.NewDesc("glmtopo:transport_latency_us", "Per-message latency quantiles in microseconds.", append(labels, "direction", "quantile"), nil)
	descWire    = prometheus.NewDesc("glmtopo:transport_wire_bytes_total", "Bytes the kernel or the NIC counted on a link's sockets or port.", append(labels, "direction", "source"), nil)
	descRetrans = prometheus.NewDesc("glmtopo:transport_retransmits_total", "TCP segments retransmitted on a link's sockets.", labels, nil)
)

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descBytes, descMsgs, descLatency, descWire, descRetrans} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	for _, s := range c.r.Snapshots() {
		counter := func(d *prometheus.Desc, v uint64, extra ...string) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), append([]string{s.Link, s.Peer}, extra...)...)
		}
		gauge := func(v float64, extra ...string) {
			ch <- prometheus.MustNewConstMetric(descLatency, prometheus.GaugeValue, v, append([]string{s.Link, s.Peer}, extra...)...)
		}
		counter(descBytes, s.BytesSent, "send")
		counter(descBytes, s.BytesRecv, "recv")
		counter(descMsgs, s.MsgsSent, "send")
		counter(descMsgs, s.MsgsRecv, "recv")
		gauge(s.SendP50us, "send", "0.5")
		gauge(s.SendP99us, "send", "0.99")
		gauge(s.RecvP50us, "recv", "0.5")
		gauge(s.RecvP99us, "recv", "0.99")
		if w := s.Wire; w != nil {
			counter(descWire, w.BytesSent, "send", w.Source)
			counter(descWire, w.BytesRecv, "recv", w.Source)
			counter(descRetrans, w.Retransmits)
		}
	}
}

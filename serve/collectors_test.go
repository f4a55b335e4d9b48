package serve

import (
	"strings"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/transport/telemetry"
)

// The pipeline's transport telemetry, registered by the CLI, is on
// /metrics: bytes, messages and latency quantiles per link and direction;
// a second registration of the same collector is an error.
func TestTransportMetrics(t *testing.T) {
	s, _ := newTestServer(t, testConfig(), newFakeGen(scriptText(t, "x")))
	reg := telemetry.NewRegistry()
	link := telemetry.NewLinkStats("tcp", "stage1 (10.0.0.2:7000)")
	reg.Add(link, nil)
	c := telemetry.NewCollector(reg)
	if err := s.RegisterCollector(c); err != nil {
		t.Fatal(err)
	}
	link.Sent(10_240, 40*time.Microsecond)
	link.Sent(10_240, 60*time.Microsecond)
	link.Received(1_000, 90*time.Microsecond)
	m := scrapeMetrics(t, s)
	for _, want := range []string{
		`glmtopo:transport_bytes_total{direction="send",link="tcp",peer="stage1 (10.0.0.2:7000)"} 20480`,
		`glmtopo:transport_bytes_total{direction="recv",link="tcp",peer="stage1 (10.0.0.2:7000)"} 1000`,
		`glmtopo:transport_messages_total{direction="send",link="tcp",peer="stage1 (10.0.0.2:7000)"} 2`,
		`glmtopo:transport_latency_us{direction="recv",link="tcp",peer="stage1 (10.0.0.2:7000)",quantile="0.99"} 90`,
		`glmtopo:num_requests_running`, // the server's own metrics are still there
	} {
		if !strings.Contains(m, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if err := s.RegisterCollector(c); err == nil {
		t.Error("registering the transport collector twice succeeded")
	}
	reg.Remove(link) // a closed link leaves /metrics
	if m := scrapeMetrics(t, s); strings.Contains(m, "glmtopo:transport_bytes_total{") {
		t.Error("a removed link is still on /metrics")
	}
}

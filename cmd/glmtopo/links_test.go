package main

import (
	"flag"
	"io"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/transport/telemetry"
)

// The node runtime hands its stage's links to `glmtopo status`: counters,
// latencies and the kernel's wire counters, per link.
func TestNodeRuntimeLinks(t *testing.T) {
	var r nodeRuntime
	if got := r.Links(); got != nil {
		t.Fatalf("links before the flags: %+v", got)
	}
	fs := flag.NewFlagSet("node", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	r.AddFlags(fs)
	s := telemetry.NewLinkStats("tcp", "stage1 (127.0.0.1:7000)")
	s.Sent(4096, 30*time.Microsecond)
	r.links.Add(s, func() *telemetry.Wire {
		return &telemetry.Wire{Source: "tcp_info", BytesSent: 4200, BytesRecv: 90, Retransmits: 1}
	})
	got := r.Links()
	if len(got) != 1 {
		t.Fatalf("%d links", len(got))
	}
	l := got[0]
	if l.Link != "tcp" || l.Peer != "stage1 (127.0.0.1:7000)" || l.BytesSent != 4096 || l.MsgsSent != 1 || l.SendP50us != 30 ||
		l.WireSource != "tcp_info" || l.WireBytesSent != 4200 || l.WireBytesRecv != 90 || l.Retransmits != 1 {
		t.Fatalf("link status %+v", l)
	}
}

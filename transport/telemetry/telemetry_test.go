package telemetry

import (
	"io"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func TestLinkStats(t *testing.T) {
	s := NewLinkStats("tcp", "stage1")
	for i := range 100 {
		s.Sent(1000, time.Duration(i+1)*time.Microsecond)
	}
	s.Received(5, 3*time.Millisecond)
	snap := s.Snapshot()
	if snap.BytesSent != 100_000 || snap.MsgsSent != 100 || snap.BytesRecv != 5 || snap.MsgsRecv != 1 {
		t.Fatalf("counters: %+v", snap)
	}
	if snap.SendP50us < 49 || snap.SendP50us > 51 || snap.SendP99us < 98 || snap.SendP99us > 100 {
		t.Fatalf("send quantiles p50 %v p99 %v, want ≈50 and ≈99", snap.SendP50us, snap.SendP99us)
	}
	if snap.RecvP50us < 2990 || snap.RecvP50us > 3010 {
		t.Fatalf("recv p50 %v µs, want ≈3000", snap.RecvP50us)
	}
}

func TestCollector(t *testing.T) {
	r := NewRegistry()
	s := NewLinkStats("tcp", "stage1")
	s.Sent(42, time.Millisecond)
	r.Add(s, func() *Wire { return &Wire{Source: "tcp_info", BytesSent: 99, Retransmits: 3} })
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewCollector(r))
	series := func() map[string]float64 {
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]float64{}
		for _, mf := range mfs {
			for _, m := range mf.GetMetric() {
				key := mf.GetName()
				for _, l := range m.GetLabel() {
					key += "," + l.GetName() + "=" + l.GetValue()
				}
				if c := m.GetCounter(); c != nil {
					out[key] = c.GetValue()
				} else {
					out[key] = m.GetGauge().GetValue()
				}
			}
		}
		return out
	}
	got := series()
	for k, v := range map[string]float64{
		"glmtopo:transport_retransmits_total,link=tcp,peer=stage1":                               3,
		"glmtopo:transport_bytes_total,direction=send,link=tcp,peer=stage1":                      42,
		"glmtopo:transport_wire_bytes_total,direction=send,link=tcp,peer=stage1,source=tcp_info": 99,
		"glmtopo:transport_latency_us,direction=send,link=tcp,peer=stage1,quantile=0.5":          1000,
	} {
		if got[k] != v {
			t.Errorf("%s = %v, want %v (have %v)", k, got[k], v, got)
		}
	}
	r.Remove(s)
	if n := len(series()); n != 0 {
		t.Fatalf("%d series after the link was removed", n)
	}
}

// TestRxFilterCountsPayload: on a loopback connection (no loss) the socket
// filter counts exactly the payload bytes written. Skips without root/BTF.
func TestRxFilterCountsPayload(t *testing.T) {
	if err := BPFAvailable(); err != nil {
		t.Skip(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	f, err := AttachRxFilter(s.(*net.TCPConn))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const n = 3<<20 + 17
	go c.Write(make([]byte, n))
	s.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(s, make([]byte, n)); err != nil {
		t.Fatal(err)
	}
	b, segs, err := f.Read()
	if err != nil {
		t.Fatal(err)
	}
	w, err := WireOf(c.(*net.TCPConn), s.(*net.TCPConn))
	if err != nil || w.BytesRecv != n {
		t.Fatalf("TCP_INFO: %+v %v", w, err)
	}
	// Every payload byte crosses the filter at least once; a segment the
	// receiver dropped under memory pressure after the filter (a slow
	// reader) crosses again when retransmitted, as TCP_INFO's bytes_sent
	// (retransmissions included) also counts.
	t.Logf("filter %d bytes in %d segments; sent %d, TCP_INFO bytes_sent %d (retransmitted %d)", b, segs, n, w.BytesSent, w.BytesRetrans)
	if b < n || float64(b) > 1.01*float64(w.BytesSent) || segs == 0 {
		t.Fatalf("filter counted %d bytes in %d segments; %d were written, %d sent with retransmissions", b, segs, n, w.BytesSent)
	}
}

package node

import (
	"bytes"
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestStatusShowsLinks: a daemon whose runtime reports data-plane links
// serves them on the control socket (what `glmtopo status` reads) and the
// text status prints their traffic.
func TestStatusShowsLinks(t *testing.T) {
	links := []LinkStatus{
		{Link: "tcp", Peer: "stage1 (10.0.0.2:7000)", BytesSent: 3 << 20, BytesRecv: 5 << 20, MsgsSent: 12, MsgsRecv: 11,
			SendP50us: 40, SendP99us: 90, RecvP50us: 55, RecvP99us: 120,
			WireSource: "tcp_info", WireBytesSent: 3<<20 + 4096, WireBytesRecv: 5<<20 + 4096, Retransmits: 2},
		{Link: "tcp", Peer: "stage3 (10.0.0.4:7000)", MsgsRecv: 1},
	}
	var calls atomic.Int32
	ds := startInProcess(t, 1, func(_ int, o *Options) {
		o.Links = func() []LinkStatus { calls.Add(1); return links }
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := QueryStatus(ctx, ds[0].opts.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Links) != 2 || st.Links[0] != links[0] || st.Links[1] != links[1] || calls.Load() == 0 {
		t.Fatalf("status links %+v (%d calls), want %+v", st.Links, calls.Load(), links)
	}
	var buf bytes.Buffer
	if err := WriteStatusText(&buf, st); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	for _, want := range []string{"data-plane links:", "stage1 (10.0.0.2:7000)", "3.0 MiB", "40/90 µs", "55/120 µs",
		"tcp_info: 3.0 MiB out, 5.0 MiB in, 2 retransmits", "stage3 (10.0.0.4:7000)", "0 B"} {
		if !strings.Contains(out, want) {
			t.Errorf("status text lacks %q:\n%s", want, out)
		}
	}
	// No links (a single-host plan): no section.
	buf.Reset()
	st.Links = nil
	WriteStatusText(&buf, st)
	if strings.Contains(buf.String(), "data-plane") {
		t.Errorf("a status without links prints a links section:\n%s", buf.String())
	}
}

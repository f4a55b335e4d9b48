package tcp

import (
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/transport"
	"github.com/glmtopo/glmtopo/transport/telemetry"
)

// TestLinksRegister: links made with Config.Registry (as the pipeline's
// stages and the head's ring are, through the CLI) appear in it with their
// traffic and the kernel's TCP_INFO counters, and leave it when closed.
func TestLinksRegister(t *testing.T) {
	key := testKey(t)
	reg := telemetry.NewRegistry()
	dc, ac := cfg("head", key), cfg("stage1", key)
	dc.Registry, ac.Registry = reg, reg
	d, a := pair(t, dc, ac)
	if n := len(reg.Snapshots()); n != 2 {
		t.Fatalf("%d links registered, want 2", n)
	}
	ctx := ctxT(t, 10*time.Second)
	payload := pattern(1, 10_240)
	for i := range 3 {
		if err := d.Send(ctx, msg(uint64(i), payload)); err != nil {
			t.Fatal(err)
		}
		var m transport.Message
		if err := a.Recv(ctx, &m); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range reg.Snapshots() {
		sent := s.Peer == d.Peer()
		if sent && (s.MsgsSent != 3 || s.BytesSent < 3*10_240) || !sent && (s.MsgsRecv != 3 || s.BytesRecv < 3*10_240) {
			t.Errorf("link to %s: %+v", s.Peer, s)
		}
		if s.Wire == nil || sent && s.Wire.BytesSent < 3*10_240 {
			t.Errorf("link to %s: kernel counters %+v", s.Peer, s.Wire)
		}
	}
	d.Close()
	a.Close()
	if n := len(reg.Snapshots()); n != 0 {
		t.Fatalf("%d links still registered after Close", n)
	}
}

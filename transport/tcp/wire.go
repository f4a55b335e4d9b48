package tcp

import (
	"net"
	"sync"

	"github.com/glmtopo/glmtopo/transport/telemetry"
)

// wireCounters are the kernel's view of a link's two sockets.
type wireCounters struct {
	out, in *net.TCPConn
	rx      *telemetry.RxFilter     // on the incoming socket; nil without BPF
	retrans *telemetry.RetransProbe // watches the outgoing socket; nil without BPF
}

// degradeOnce keeps the "no eBPF" notice to one line per process.
var degradeOnce sync.Once

func attachWire(cfg Config, out, in *net.TCPConn) *wireCounters {
	w := &wireCounters{out: out, in: in}
	if !cfg.WireCounters {
		return w
	}
	rx, err := telemetry.AttachRxFilter(in)
	if err == nil {
		w.rx = rx
		if p, perr := telemetry.NewRetransProbe(); perr == nil && p.Watch(out) == nil {
			w.retrans = p
		} else {
			if p != nil {
				p.Close()
			}
			err = perr
		}
	}
	if err != nil {
		degradeOnce.Do(func() {
			cfg.Logger.Info("transport: wire counters from TCP_INFO only", "reason", err)
		})
	}
	return w
}

// read returns TCP_INFO, plus the eBPF counts where loaded; nil when the
// sockets are gone.
func (w *wireCounters) read() *telemetry.Wire {
	wire, err := telemetry.WireOf(w.out, w.in)
	if err != nil {
		return nil
	}
	if w.rx != nil {
		if b, segs, err := w.rx.Read(); err == nil {
			wire.Source = "ebpf+tcp_info"
			wire.FilterBytesRx, wire.SegmentsRecv = b, segs
		}
	}
	if w.retrans != nil {
		if n, err := w.retrans.Count(w.out); err == nil {
			wire.Retransmits = n
		}
	}
	return wire
}

func (w *wireCounters) close() {
	if w.rx != nil {
		w.rx.Close()
	}
	if w.retrans != nil {
		w.retrans.Close()
	}
}

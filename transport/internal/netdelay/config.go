package netdelay

import (
	"log/slog"
	"time"
)

// Config is one delay line on one NFQUEUE queue of the calling thread's
// network namespace.
type Config struct {
	Queue  uint16
	Delay  time.Duration
	Jitter time.Duration  // uniform in ±Jitter; order is kept regardless
	Rand   func() float64 // jitter's source, in [0, 1); needed when Jitter > 0
	// MaxLen bounds the kernel's queue and so this process's memory (the
	// line holds one small entry per queued packet). When it is full the
	// kernel drops the packet and counts it (Stats.KernelDropped), as a
	// netem queue over its limit does, unless FailOpen lets it through
	// undelayed.
	MaxLen   uint32
	FailOpen bool
	Ready    func() // called once the queue is bound and configured
	Logger   *slog.Logger
}

// Stats is what a delay line did.
type Stats struct {
	Packets  uint64        // packets received from the kernel
	Accepted uint64        // packets released by verdicts (batches cover lost messages too)
	Batches  uint64        // batch verdicts sent
	Overruns uint64        // ENOBUFS: packet messages lost; a later batch verdict releases those packets
	Errors   uint64        // error replies to verdicts
	MaxLen   int           // most packets waiting at once
	MaxLate  time.Duration // latest release after a packet's due time

	// From /proc/net/netfilter/nfnetlink_queue just before unbinding.
	KernelDropped uint64 // queue full
	UserDropped   uint64 // the kernel could not deliver to the socket
}

// Package telemetry counts what a transport link moves: user-space counters
// and HdrHistogram latencies per link (always), the kernel's TCP_INFO for a
// link's sockets, wire bytes seen by an eBPF socket filter where the process
// may load BPF programs (root and BTF), and RDMA port counters (rdmamap) for
// NICs whose traffic the kernel never sees. Without root or BTF the eBPF
// constructors return ErrNoBPF and without an RDMA port RDMAWire fails: the
// package logs nothing itself; its callers degrade (transport/tcp, asked for
// wire counters, keeps TCP_INFO and logs one line per process; an NCCL
// link's Wire is nil).
package telemetry

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
)

// LinkStats are one link's user-space counters. Safe for concurrent use.
type LinkStats struct {
	Peer string
	Link string // "tcp", "nccl", "inproc"

	bytesSent, bytesRecv atomic.Uint64
	msgsSent, msgsRecv   atomic.Uint64

	mu      sync.Mutex
	sendLat *hdrhistogram.Histogram // microseconds
	recvLat *hdrhistogram.Histogram
}

// NewLinkStats returns empty counters for a link to peer.
func NewLinkStats(link, peer string) *LinkStats {
	return &LinkStats{
		Link: link, Peer: peer,
		// 1 µs … 100 s, 3 significant digits.
		sendLat: hdrhistogram.New(1, 100_000_000, 3),
		recvLat: hdrhistogram.New(1, 100_000_000, 3),
	}
}

// Sent records one sent message of n bytes that took d.
func (s *LinkStats) Sent(n int64, d time.Duration) {
	s.bytesSent.Add(uint64(n))
	s.msgsSent.Add(1)
	s.mu.Lock()
	s.sendLat.RecordValue(max(1, d.Microseconds()))
	s.mu.Unlock()
}

// Received records one received message of n bytes, d from its first byte
// to its last.
func (s *LinkStats) Received(n int64, d time.Duration) {
	s.bytesRecv.Add(uint64(n))
	s.msgsRecv.Add(1)
	s.mu.Lock()
	s.recvLat.RecordValue(max(1, d.Microseconds()))
	s.mu.Unlock()
}

// Snapshot is a copy of a link's counters, with the kernel's where known.
type Snapshot struct {
	Link      string  `json:"link"`
	Peer      string  `json:"peer"`
	BytesSent uint64  `json:"bytes_sent"`
	BytesRecv uint64  `json:"bytes_recv"`
	MsgsSent  uint64  `json:"messages_sent"`
	MsgsRecv  uint64  `json:"messages_recv"`
	SendP50us float64 `json:"send_p50_us"`
	SendP99us float64 `json:"send_p99_us"`
	RecvP50us float64 `json:"recv_p50_us"`
	RecvP99us float64 `json:"recv_p99_us"`
	Wire      *Wire   `json:"wire,omitempty"`
}

// Wire is what the kernel (TCP_INFO, eBPF) or the NIC saw of a link.
type Wire struct {
	Source         string `json:"source"` // "tcp_info", "ebpf+tcp_info", "rdma"
	BytesSent      uint64 `json:"bytes_sent"`
	BytesRecv      uint64 `json:"bytes_recv"`
	Retransmits    uint64 `json:"retransmits"` // the eBPF probe's count where loaded, else TCP_INFO's
	TCPInfoRetrans uint64 `json:"tcp_info_retransmits"`
	BytesRetrans   uint64 `json:"bytes_retransmitted"`
	SegmentsRecv   uint64 `json:"segments_recv,omitempty"`
	FilterBytesRx  uint64 `json:"ebpf_bytes_recv,omitempty"` // TCP payload bytes the socket filter saw arrive
}

// Snapshot copies the counters.
func (s *LinkStats) Snapshot() Snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	return Snapshot{
		Link: s.Link, Peer: s.Peer,
		BytesSent: s.bytesSent.Load(), BytesRecv: s.bytesRecv.Load(),
		MsgsSent: s.msgsSent.Load(), MsgsRecv: s.msgsRecv.Load(),
		SendP50us: float64(s.sendLat.ValueAtQuantile(50)), SendP99us: float64(s.sendLat.ValueAtQuantile(99)),
		RecvP50us: float64(s.recvLat.ValueAtQuantile(50)), RecvP99us: float64(s.recvLat.ValueAtQuantile(99)),
	}
}

// Registry holds the live links' stats for /metrics and status.
type Registry struct {
	mu    sync.Mutex
	links map[*LinkStats]func() *Wire
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry { return &Registry{links: map[*LinkStats]func() *Wire{}} }

// Add registers a link; wire (may be nil) reads its kernel counters.
func (r *Registry) Add(s *LinkStats, wire func() *Wire) {
	r.mu.Lock()
	r.links[s] = wire
	r.mu.Unlock()
}

// Remove forgets a closed link.
func (r *Registry) Remove(s *LinkStats) {
	r.mu.Lock()
	delete(r.links, s)
	r.mu.Unlock()
}

// Snapshots returns every registered link's counters.
func (r *Registry) Snapshots() []Snapshot {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]Snapshot, 0, len(r.links))
	for s, wire := range r.links {
		snap := s.Snapshot()
		if wire != nil {
			snap.Wire = wire()
		}
		out = append(out, snap)
	}
	return out
}

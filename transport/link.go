// Package transport moves a pipeline step's tensors between stage
// processes. A Link is an ordered, reliable stream of messages, each a small
// msgpack header (step, micro-batch, kind, tensor shapes and dtypes, per
// sequence metadata) and zero or more payloads from host or device memory.
//
// Implementations: Pipe (in-process, for tests and stages sharing a
// process), transport/tcp (one authenticated TCP connection per direction)
// and transport/nccl (headers on a TCP link, payloads with
// ncclSend/ncclRecv); a TCP link moves device payloads through a Stager
// (transport/cudastage), and transport/telemetry counts what links move.
// Every Send and Recv error names the peer and the step (*Error); every wait
// honours its context; sizes claimed by a peer are checked against Limits
// before they turn into allocations. In-flight bytes are bounded: a TCP link
// has no queue of its own (Send returns once the kernel holds the frame, and
// the receiver reads a frame only inside Recv, so a slow receiver blocks the
// sender through TCP's window), an NCCL Send waits for its transfer, and
// Pipe holds at most maxInFlight bytes per direction.
package transport

import (
	"context"

	"github.com/glmtopo/glmtopo/transport/telemetry"
)

// Link is one stage-to-stage connection, both directions. Send and Recv may
// be called from different goroutines; concurrent Sends are serialised
// (messages are never interleaved), as are concurrent Recvs.
type Link interface {
	// Send transmits m. It returns when the payloads may be reused: for TCP,
	// when the kernel holds the bytes; backpressure blocks it.
	Send(ctx context.Context, m *Message) error
	// Recv reads the next message into m, reusing m's header slices and
	// payload buffers: a payload i whose Buffer has Dev set is written to
	// that device memory (an error if its Bytes are too few; Bytes becomes
	// the size received), otherwise Host is resized (reallocated only when
	// too small).
	Recv(ctx context.Context, m *Message) error
	// Peer names the other end.
	Peer() string
	// Stats returns the link's counters.
	Stats() *telemetry.LinkStats
	Close() error
}

// Stager moves device payloads through page-locked host buffers. Copies are
// asynchronous so a chunk crosses the bus while the previous one crosses the
// wire; Slots returns the staging buffers, which alternate.
type Stager interface {
	Slots() [][]byte
	// ToHost starts copying n bytes from device address src into slot.
	ToHost(slot int, src uintptr, n int) error
	// ToDevice starts copying n bytes from slot to device address dst.
	ToDevice(slot int, dst uintptr, n int) error
	// Wait blocks until the slot's last copy has finished.
	Wait(slot int) error
}

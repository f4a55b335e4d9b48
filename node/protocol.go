package node

import (
	"fmt"
	"io"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/vmihailenco/msgpack/v5"
)

// Protocol ids carry the wire version; a peer speaking another major version
// fails protocol negotiation instead of misreading messages.
const (
	protoHello     protocol.ID = "/glmtopo/hello/1.0.0"
	protoHeartbeat protocol.ID = "/glmtopo/heartbeat/1.0.0"
	protoPlan      protocol.ID = "/glmtopo/plan/1.0.0"
	protoLeave     protocol.ID = "/glmtopo/leave/1.0.0"

	// wireVersion is also carried in every message so a decoder can refuse a
	// message from a newer minor revision it would misread.
	wireVersion = 1

	maxMessageBytes = 4 << 20
)

// helloMsg introduces a daemon: sent on every new connection, both ways.
type helloMsg struct {
	Version   int           `msgpack:"v"`
	ID        string        `msgpack:"id"`
	Instance  string        `msgpack:"instance"` // random per process start
	Name      string        `msgpack:"name"`
	Head      bool          `msgpack:"head"`
	Model     ModelRef      `msgpack:"model"`
	Addrs     []string      `msgpack:"addrs"`
	Inventory HostInventory `msgpack:"inventory"`
	DataAddr  string        `msgpack:"data_addr,omitempty"` // pipeline ring endpoint (host:port), if any
}

type helloReply struct {
	Version  int      `msgpack:"v"`
	Accepted bool     `msgpack:"accepted"`
	Reason   string   `msgpack:"reason"`
	Hello    helloMsg `msgpack:"hello"`
}

// heartbeatMsg is sent to every member each heartbeat interval. It also
// gossips live members' addresses, so static peer lists need not be complete,
// and the sender's plan epochs, so a new coordinator never reuses an epoch.
type heartbeatMsg struct {
	Version     int            `msgpack:"v"`
	ID          string         `msgpack:"id"`
	Instance    string         `msgpack:"instance"`
	Seq         uint64         `msgpack:"seq"`
	Members     []memberDigest `msgpack:"members"`
	ActiveEpoch uint64         `msgpack:"active_epoch"`
	MaxEpoch    uint64         `msgpack:"max_epoch"`
	// Stage is the sender's stage of its active plan (state and counters),
	// so every member's status covers every stage; absent without a
	// runtime. Older daemons ignore it.
	Stage *stageReport `msgpack:"stage,omitempty"`
}

type memberDigest struct {
	ID    string   `msgpack:"id"`
	Addrs []string `msgpack:"addrs"`
}

const (
	planAssign = "assign" // proposal: validate, keep pending, ack
	planCommit = "commit" // every member acked: make it active
)

type planMsg struct {
	Version int         `msgpack:"v"`
	Kind    string      `msgpack:"kind"`
	From    string      `msgpack:"from"`
	Plan    ClusterPlan `msgpack:"plan"`
}

type planReply struct {
	Version int    `msgpack:"v"`
	OK      bool   `msgpack:"ok"`
	Error   string `msgpack:"error"`
}

type leaveMsg struct {
	Version  int    `msgpack:"v"`
	ID       string `msgpack:"id"`
	Instance string `msgpack:"instance"`
}

// versioned lets readMsg check the version of any message.
type versioned interface{ version() int }

func (m *helloMsg) version() int     { return m.Version }
func (m *helloReply) version() int   { return m.Version }
func (m *heartbeatMsg) version() int { return m.Version }
func (m *planMsg) version() int      { return m.Version }
func (m *planReply) version() int    { return m.Version }
func (m *leaveMsg) version() int     { return m.Version }

func writeMsg(s network.Stream, v any, timeout time.Duration) error {
	s.SetWriteDeadline(time.Now().Add(timeout))
	b, err := msgpack.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode: %w", err)
	}
	if len(b) > maxMessageBytes {
		return fmt.Errorf("message of %d bytes exceeds %d", len(b), maxMessageBytes)
	}
	// A 4-byte length prefix frames the message so the reader knows where it
	// ends without waiting for the writer to close.
	hdr := []byte{byte(len(b) >> 24), byte(len(b) >> 16), byte(len(b) >> 8), byte(len(b))}
	if _, err := s.Write(append(hdr, b...)); err != nil {
		return fmt.Errorf("write %s: %w", s.Protocol(), err)
	}
	return nil
}

func readMsg(s network.Stream, v versioned, timeout time.Duration) error {
	s.SetReadDeadline(time.Now().Add(timeout))
	var hdr [4]byte
	if _, err := io.ReadFull(s, hdr[:]); err != nil {
		return fmt.Errorf("read %s: %w", s.Protocol(), err)
	}
	n := int(hdr[0])<<24 | int(hdr[1])<<16 | int(hdr[2])<<8 | int(hdr[3])
	if n > maxMessageBytes {
		return fmt.Errorf("read %s: message of %d bytes exceeds %d", s.Protocol(), n, maxMessageBytes)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(s, b); err != nil {
		return fmt.Errorf("read %s: %w", s.Protocol(), err)
	}
	return decodeMsg(b, v)
}

func decodeMsg(b []byte, v versioned) error {
	if err := msgpack.Unmarshal(b, v); err != nil {
		return fmt.Errorf("decode: %w", err)
	}
	if v.version() != wireVersion {
		return fmt.Errorf("unsupported wire version %d (this daemon speaks %d)", v.version(), wireVersion)
	}
	return nil
}

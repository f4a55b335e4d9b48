package telemetry

import (
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

// TCPInfo reads the kernel's counters for one TCP socket (TCP_INFO: bytes
// sent, acknowledged-received, retransmitted). No privileges needed.
func TCPInfo(c syscall.Conn) (*unix.TCPInfo, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var info *unix.TCPInfo
	var serr error
	err = raw.Control(func(fd uintptr) {
		info, serr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return nil, fmt.Errorf("TCP_INFO: %w", err)
	}
	return info, nil
}

// WireOf combines the TCP_INFO of a link's outgoing and incoming sockets.
func WireOf(out, in syscall.Conn) (*Wire, error) {
	o, err := TCPInfo(out)
	if err != nil {
		return nil, err
	}
	i, err := TCPInfo(in)
	if err != nil {
		return nil, err
	}
	return &Wire{
		Source:         "tcp_info",
		BytesSent:      o.Bytes_sent,
		BytesRecv:      i.Bytes_received,
		Retransmits:    uint64(o.Total_retrans),
		TCPInfoRetrans: uint64(o.Total_retrans),
		BytesRetrans:   o.Bytes_retrans,
	}, nil
}

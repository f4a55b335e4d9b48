// Package netdelay is a delay line for emulated hosts on kernels without
// sch_netem: an iptables NFQUEUE rule hands each packet leaving a network
// namespace to this package, which gives it back (NF_ACCEPT) a fixed delay
// later, in arrival order. It speaks nfnetlink_queue directly (no libnfnetlink),
// copies only each packet's metadata, and accepts packets in batches
// (NFQNL_MSG_VERDICT_BATCH), so one verdict releases every packet due.
//
// nfq.go encodes and decodes the few netlink messages this needs; it is pure
// so that it is tested without root. line.go orders and times the packets;
// queue_linux.go owns the socket.
package netdelay

import (
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"
)

// Netlink and nfnetlink_queue constants (linux/netlink.h,
// linux/netfilter/nfnetlink.h, linux/netfilter/nfnetlink_queue.h). They are
// spelled out here, not taken from x/sys/unix, so that the encoding is
// testable and fixed on every platform.
const (
	netlinkNetfilter = 12 // NETLINK_NETFILTER

	nlmsgHdrLen  = 16
	nfgenHdrLen  = 4
	nlattrHdrLen = 4

	nlmsgNoop    = 1
	nlmsgError   = 2
	nlmsgDone    = 3
	nlmsgOverrun = 4

	nlmFRequest = 0x1
	nlmFAck     = 0x4

	nlaTypeMask = 0x3fff // strips NLA_F_NESTED and NLA_F_NET_BYTEORDER

	subsysQueue = 3 // NFNL_SUBSYS_QUEUE

	msgPacket       = 0 // NFQNL_MSG_PACKET
	msgVerdict      = 1 // NFQNL_MSG_VERDICT
	msgConfig       = 2 // NFQNL_MSG_CONFIG
	msgVerdictBatch = 3 // NFQNL_MSG_VERDICT_BATCH

	attrPacketHdr  = 1 // NFQA_PACKET_HDR
	attrVerdictHdr = 2 // NFQA_VERDICT_HDR
	attrIfIndexIn  = 5 // NFQA_IFINDEX_INDEV
	attrIfIndexOut = 6 // NFQA_IFINDEX_OUTDEV

	attrCfgCmd    = 1 // NFQA_CFG_CMD
	attrCfgParams = 2 // NFQA_CFG_PARAMS
	attrCfgMaxLen = 3 // NFQA_CFG_QUEUE_MAXLEN
	attrCfgMask   = 4 // NFQA_CFG_MASK
	attrCfgFlags  = 5 // NFQA_CFG_FLAGS

	cmdBind   = 1 // NFQNL_CFG_CMD_BIND
	cmdUnbind = 2 // NFQNL_CFG_CMD_UNBIND

	copyMeta = 1 // NFQNL_COPY_META: metadata only, no payload

	// FlagFailOpen: when the queue is full the kernel accepts a packet
	// undelayed instead of dropping it.
	FlagFailOpen = 0x1 // NFQA_CFG_F_FAIL_OPEN
	// FlagGSO: hand over GSO packets whole; without it the kernel segments
	// every one before queueing, which costs more than the delay line.
	FlagGSO = 0x4 // NFQA_CFG_F_GSO

	// Verdicts (linux/netfilter.h).
	VerdictDrop   = 0 // NF_DROP
	VerdictAccept = 1 // NF_ACCEPT
)

// Packet is what the kernel tells about one queued packet.
type Packet struct {
	ID     uint32 // the queue's sequence number; verdicts name it
	Proto  uint16 // hw protocol (EtherType), e.g. 0x0800 for IPv4
	Hook   uint8  // netfilter hook: 3 is LOCAL_OUT
	InDev  uint32 // ifindex, 0 if none
	OutDev uint32
}

// Event is one decoded netlink message: a packet, or an acknowledgement or
// error (Errno 0 is an ack) for the request with sequence number Seq.
type Event struct {
	Packet *Packet
	IsAck  bool
	Seq    uint32
	Errno  syscall.Errno
}

var (
	errShort = errors.New("netlink: message truncated")
)

func nlmsgAlign(n int) int { return (n + 3) &^ 3 }

// message builds one nfnetlink_queue request: the netlink header, the
// nfgenmsg header naming the queue, and attrs (each already encoded).
func message(typ uint8, flags uint16, seq uint32, queue uint16, attrs ...[]byte) []byte {
	n := nlmsgHdrLen + nfgenHdrLen
	for _, a := range attrs {
		n += nlmsgAlign(len(a))
	}
	b := make([]byte, n)
	binary.NativeEndian.PutUint32(b[0:], uint32(n))
	binary.NativeEndian.PutUint16(b[4:], subsysQueue<<8|uint16(typ))
	binary.NativeEndian.PutUint16(b[6:], nlmFRequest|flags)
	binary.NativeEndian.PutUint32(b[8:], seq)
	// b[12:16]: port id 0, the kernel.
	b[16] = syscall.AF_UNSPEC
	b[17] = 0 // NFNETLINK_V0
	binary.BigEndian.PutUint16(b[18:], queue)
	off := nlmsgHdrLen + nfgenHdrLen
	for _, a := range attrs {
		copy(b[off:], a)
		off += nlmsgAlign(len(a))
	}
	return b
}

// attr encodes one netlink attribute (header in host order, value as given).
func attr(typ uint16, val []byte) []byte {
	b := make([]byte, nlattrHdrLen+len(val))
	binary.NativeEndian.PutUint16(b[0:], uint16(len(b)))
	binary.NativeEndian.PutUint16(b[2:], typ)
	copy(b[nlattrHdrLen:], val)
	return b
}

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

// BindMsg asks the kernel to deliver queue's packets to this socket.
func BindMsg(seq uint32, queue uint16) []byte {
	return message(msgConfig, nlmFAck, seq, queue, attr(attrCfgCmd, []byte{cmdBind, 0, 0, 0}))
}

// UnbindMsg releases queue.
func UnbindMsg(seq uint32, queue uint16) []byte {
	return message(msgConfig, nlmFAck, seq, queue, attr(attrCfgCmd, []byte{cmdUnbind, 0, 0, 0}))
}

// ParamsMsg sets metadata-only copies, the kernel's queue length bound and
// the flags (FlagGSO, FlagFailOpen); flags not given are cleared.
func ParamsMsg(seq uint32, queue uint16, maxLen, flags uint32) []byte {
	params := append(be32(0), copyMeta) // copy_range (unused for META), copy_mode
	return message(msgConfig, nlmFAck, seq, queue,
		attr(attrCfgParams, params),
		attr(attrCfgMaxLen, be32(maxLen)),
		attr(attrCfgMask, be32(FlagGSO|FlagFailOpen)),
		attr(attrCfgFlags, be32(flags)))
}

// VerdictMsg gives verdict to packet id alone.
func VerdictMsg(seq uint32, queue uint16, id, verdict uint32) []byte {
	return message(msgVerdict, 0, seq, queue, attr(attrVerdictHdr, append(be32(verdict), be32(id)...)))
}

// BatchVerdictMsg gives verdict to every packet of queue with an id up to
// and including id: one message releases all packets that fell due.
func BatchVerdictMsg(seq uint32, queue uint16, id, verdict uint32) []byte {
	return message(msgVerdictBatch, 0, seq, queue, attr(attrVerdictHdr, append(be32(verdict), be32(id)...)))
}

// Parse decodes the netlink messages of one datagram and appends them to
// evs. Messages other than packets, acks and errors are skipped. A
// malformed datagram is an error; the events decoded before it are kept.
func Parse(evs []Event, b []byte) ([]Event, error) {
	for len(b) > 0 {
		if len(b) < nlmsgHdrLen {
			return evs, fmt.Errorf("%w: %d bytes left, a header is %d", errShort, len(b), nlmsgHdrLen)
		}
		n := int(binary.NativeEndian.Uint32(b[0:]))
		if n < nlmsgHdrLen || n > len(b) {
			return evs, fmt.Errorf("netlink: message length %d with %d bytes left", n, len(b))
		}
		typ := binary.NativeEndian.Uint16(b[4:])
		seq := binary.NativeEndian.Uint32(b[8:])
		body := b[nlmsgHdrLen:n]
		switch {
		case typ == nlmsgError:
			if len(body) < 4 {
				return evs, fmt.Errorf("%w: error message of %d bytes", errShort, len(body))
			}
			code := int32(binary.NativeEndian.Uint32(body))
			evs = append(evs, Event{IsAck: true, Seq: seq, Errno: syscall.Errno(-code)})
		case typ == subsysQueue<<8|msgPacket:
			p, err := parsePacket(body)
			if err != nil {
				return evs, err
			}
			evs = append(evs, Event{Packet: &p, Seq: seq})
		case typ == nlmsgNoop, typ == nlmsgDone, typ == nlmsgOverrun:
		}
		b = b[min(nlmsgAlign(n), len(b)):]
	}
	return evs, nil
}

// parsePacket decodes an NFQNL_MSG_PACKET body (nfgenmsg, then attributes).
func parsePacket(b []byte) (Packet, error) {
	var p Packet
	if len(b) < nfgenHdrLen {
		return p, fmt.Errorf("%w: packet message of %d bytes", errShort, len(b))
	}
	b = b[nfgenHdrLen:]
	var hdr bool
	for len(b) > 0 {
		if len(b) < nlattrHdrLen {
			return p, fmt.Errorf("%w: %d bytes of attribute header", errShort, len(b))
		}
		n := int(binary.NativeEndian.Uint16(b[0:]))
		typ := binary.NativeEndian.Uint16(b[2:]) & nlaTypeMask
		if n < nlattrHdrLen || n > len(b) {
			return p, fmt.Errorf("netlink: attribute %d of length %d with %d bytes left", typ, n, len(b))
		}
		v := b[nlattrHdrLen:n]
		switch typ {
		case attrPacketHdr:
			if len(v) < 7 { // __be32 packet_id, __be16 hw_protocol, __u8 hook
				return p, fmt.Errorf("%w: packet header of %d bytes", errShort, len(v))
			}
			p.ID = binary.BigEndian.Uint32(v)
			p.Proto = binary.BigEndian.Uint16(v[4:])
			p.Hook = v[6]
			hdr = true
		case attrIfIndexIn, attrIfIndexOut:
			if len(v) < 4 {
				return p, fmt.Errorf("%w: ifindex of %d bytes", errShort, len(v))
			}
			if typ == attrIfIndexIn {
				p.InDev = binary.BigEndian.Uint32(v)
			} else {
				p.OutDev = binary.BigEndian.Uint32(v)
			}
		}
		b = b[min(nlmsgAlign(n), len(b)):]
	}
	if !hdr {
		return p, errors.New("netlink: packet message without NFQA_PACKET_HDR")
	}
	return p, nil
}

// nativeSeq is the sequence number of an encoded message.
func nativeSeq(b []byte) uint32 { return binary.NativeEndian.Uint32(b[8:]) }

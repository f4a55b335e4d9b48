package netdelay

import (
	"bytes"
	"encoding/binary"
	"errors"
	"syscall"
	"testing"
)

// hdr builds a netlink header for hand-made test messages.
func hdr(n int, typ, flags uint16, seq uint32) []byte {
	b := make([]byte, nlmsgHdrLen)
	binary.NativeEndian.PutUint32(b[0:], uint32(n))
	binary.NativeEndian.PutUint16(b[4:], typ)
	binary.NativeEndian.PutUint16(b[6:], flags)
	binary.NativeEndian.PutUint32(b[8:], seq)
	return b
}

// packetMsg is what the kernel sends for a queued packet (NFQNL_MSG_PACKET).
func packetMsg(seq, id uint32, proto uint16, hook uint8, outdev uint32) []byte {
	ph := append(be32(id), byte(proto>>8), byte(proto), hook)
	body := []byte{syscall.AF_INET, 0, 0, 0}
	for _, a := range [][]byte{attr(attrPacketHdr|0x4000 /* NLA_F_NET_BYTEORDER */, ph), attr(attrIfIndexOut, be32(outdev))} {
		body = append(body, a...)
		body = append(body, make([]byte, nlmsgAlign(len(a))-len(a))...)
	}
	return append(hdr(nlmsgHdrLen+len(body), subsysQueue<<8|msgPacket, 0, seq), body...)
}

func errMsg(seq uint32, errno syscall.Errno) []byte {
	body := binary.NativeEndian.AppendUint32(nil, uint32(-int32(errno)))
	body = append(body, hdr(nlmsgHdrLen, 0, 0, seq)...) // the request's header, echoed
	return append(hdr(nlmsgHdrLen+len(body), nlmsgError, 0, seq), body...)
}

func TestEncode(t *testing.T) {
	h := func(n int, typ, flags uint16, seq uint32, queue uint16) []byte {
		return append(hdr(n, typ, flags, seq), syscall.AF_UNSPEC, 0, byte(queue>>8), byte(queue))
	}
	a := func(n, typ uint16, val ...byte) []byte {
		b := binary.NativeEndian.AppendUint16(nil, n)
		return append(binary.NativeEndian.AppendUint16(b, typ), val...)
	}
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	cfg := subsysQueue<<8 | msgConfig
	tests := []struct {
		name string
		got  []byte
		want []byte
	}{
		{"bind", BindMsg(7, 3), cat(h(28, uint16(cfg), nlmFRequest|nlmFAck, 7, 3), a(8, attrCfgCmd, cmdBind, 0, 0, 0))},
		{"unbind", UnbindMsg(8, 0x102), cat(h(28, uint16(cfg), nlmFRequest|nlmFAck, 8, 0x102), a(8, attrCfgCmd, cmdUnbind, 0, 0, 0))},
		{"params", ParamsMsg(9, 1, 1024, FlagGSO), cat(h(56, uint16(cfg), nlmFRequest|nlmFAck, 9, 1),
			a(9, attrCfgParams, 0, 0, 0, 0, copyMeta, 0, 0, 0), // 5 bytes of value, padded to 8
			a(8, attrCfgMaxLen, 0, 0, 4, 0),
			a(8, attrCfgMask, 0, 0, 0, FlagGSO|FlagFailOpen),
			a(8, attrCfgFlags, 0, 0, 0, FlagGSO))},
		{"verdict", VerdictMsg(0, 2, 0x01020304, VerdictDrop), cat(h(32, subsysQueue<<8|msgVerdict, nlmFRequest, 0, 2),
			a(12, attrVerdictHdr, 0, 0, 0, 0, 1, 2, 3, 4))},
		{"batch", BatchVerdictMsg(0, 2, 77, VerdictAccept), cat(h(32, subsysQueue<<8|msgVerdictBatch, nlmFRequest, 0, 2),
			a(12, attrVerdictHdr, 0, 0, 0, 1, 0, 0, 0, 77))},
	}
	for _, tt := range tests {
		if !bytes.Equal(tt.got, tt.want) {
			t.Errorf("%s:\n got % x\nwant % x", tt.name, tt.got, tt.want)
		}
		if len(tt.got)%4 != 0 {
			t.Errorf("%s: %d bytes, not 4-aligned", tt.name, len(tt.got))
		}
	}
	if got := nativeSeq(BindMsg(42, 0)); got != 42 {
		t.Errorf("nativeSeq = %d, want 42", got)
	}
}

func TestParse(t *testing.T) {
	two := append(packetMsg(0, 5, 0x0800, 3, 9), packetMsg(0, 6, 0x86dd, 3, 9)...)
	tests := []struct {
		name    string
		in      []byte
		want    []Event
		wantErr bool
	}{
		{"packet", packetMsg(0, 5, 0x0800, 3, 9), []Event{{Packet: &Packet{ID: 5, Proto: 0x0800, Hook: 3, OutDev: 9}}}, false},
		{"two packets", two, []Event{{Packet: &Packet{ID: 5, Proto: 0x0800, Hook: 3, OutDev: 9}}, {Packet: &Packet{ID: 6, Proto: 0x86dd, Hook: 3, OutDev: 9}}}, false},
		{"ack", errMsg(4, 0), []Event{{IsAck: true, Seq: 4}}, false},
		{"error", errMsg(5, syscall.EBUSY), []Event{{IsAck: true, Seq: 5, Errno: syscall.EBUSY}}, false},
		{"done skipped", hdr(16, nlmsgDone, 0, 1), nil, false},
		{"empty", nil, nil, false},
		{"short header", packetMsg(0, 5, 0x0800, 3, 9)[:10], nil, true},
		{"length past end", packetMsg(0, 5, 0x0800, 3, 9)[:30], nil, true},
		{"length below header", hdr(8, nlmsgDone, 0, 1), nil, true},
		{"no packet header", append(hdr(20, subsysQueue<<8|msgPacket, 0, 0), 2, 0, 0, 0), nil, true},
		{"short packet header", append(hdr(28, subsysQueue<<8|msgPacket, 0, 0), append([]byte{2, 0, 0, 0}, attr(attrPacketHdr, []byte{0, 0, 0, 1})...)...), nil, true},
		{"attribute past end", append(hdr(28, subsysQueue<<8|msgPacket, 0, 0), 2, 0, 0, 0, 40, 0, 1, 0, 0, 0, 0, 0), nil, true},
		{"packet then garbage", append(packetMsg(0, 5, 0x0800, 3, 9), 1, 2, 3), []Event{{Packet: &Packet{ID: 5, Proto: 0x0800, Hook: 3, OutDev: 9}}}, true},
		{"short error", hdr(18, nlmsgError, 0, 1), nil, true},
	}
	for _, tt := range tests {
		got, err := Parse(nil, tt.in)
		if (err != nil) != tt.wantErr {
			t.Errorf("%s: err %v, want error %v", tt.name, err, tt.wantErr)
		}
		if len(got) != len(tt.want) {
			t.Errorf("%s: %d events %+v, want %d", tt.name, len(got), got, len(tt.want))
			continue
		}
		for i := range got {
			g, w := got[i], tt.want[i]
			if g.IsAck != w.IsAck || g.Seq != w.Seq || g.Errno != w.Errno || (g.Packet == nil) != (w.Packet == nil) || (g.Packet != nil && *g.Packet != *w.Packet) {
				t.Errorf("%s: event %d = %+v (packet %+v), want %+v (packet %+v)", tt.name, i, g, g.Packet, w, w.Packet)
			}
		}
	}
}

func TestParseTruncatedIsErrShort(t *testing.T) {
	_, err := Parse(nil, make([]byte, 5))
	if !errors.Is(err, errShort) {
		t.Fatalf("err %v, want errShort", err)
	}
}

// FuzzParse: no input panics or loops; a decoded packet came from a
// message that carried a packet header.
func FuzzParse(f *testing.F) {
	f.Add(packetMsg(0, 5, 0x0800, 3, 9))
	f.Add(errMsg(3, syscall.ENOENT))
	f.Add(BindMsg(1, 0))
	f.Fuzz(func(t *testing.T, b []byte) {
		evs, _ := Parse(nil, b)
		if len(evs) > len(b)/nlmsgHdrLen {
			t.Fatalf("%d events from %d bytes", len(evs), len(b))
		}
	})
}

package telemetry

import (
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
)

// ErrNoBPF means this process cannot load BPF programs here (not root, no
// BTF, or the kernel refused); callers fall back to TCP_INFO.
var ErrNoBPF = errors.New("eBPF wire counters unavailable")

// BPFAvailable says whether the wire probes can load, with the reason when
// they cannot.
func BPFAvailable() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("%w: not root", ErrNoBPF)
	}
	if _, err := os.Stat("/sys/kernel/btf/vmlinux"); err != nil {
		return fmt.Errorf("%w: no kernel BTF (%v)", ErrNoBPF, err)
	}
	return nil
}

// RxFilter is a socket filter on one TCP socket that counts the TCP payload
// bytes and segments arriving from the wire (retransmitted duplicates
// included), before the kernel reassembles the stream.
type RxFilter struct {
	prog   *ebpf.Program
	counts *ebpf.Map // array: 0 payload bytes, 1 segments
}

// AttachRxFilter loads the filter and attaches it to c (SO_ATTACH_BPF).
func AttachRxFilter(c syscall.Conn) (*RxFilter, error) {
	if err := BPFAvailable(); err != nil {
		return nil, err
	}
	counts, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 2})
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoBPF, err)
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "glmtopo_rx", Type: ebpf.SocketFilter, License: "GPL",
		Instructions: rxFilterInsns(counts.FD()),
	})
	if err != nil {
		counts.Close()
		return nil, fmt.Errorf("%w: load socket filter: %v", ErrNoBPF, err)
	}
	if err := link.AttachSocketFilter(c, prog); err != nil {
		prog.Close()
		counts.Close()
		return nil, fmt.Errorf("%w: attach socket filter: %v", ErrNoBPF, err)
	}
	return &RxFilter{prog: prog, counts: counts}, nil
}

// rxFilterInsns: payload = skb->len - 4*(TCP data offset); add it and 1 to
// the counters; keep the whole packet (return 0xffffffff: a socket filter's
// return value is the length to keep, 0 drops).
func rxFilterInsns(mapFD int) asm.Instructions {
	const lenOff = 0 // offsetof(struct __sk_buff, len)
	insns := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.LoadMem(asm.R7, asm.R6, lenOff, asm.Word),
		// bpf_skb_load_bytes(skb, 12, fp-8, 1): the TCP header's data offset byte.
		asm.Mov.Imm(asm.R0, 0),
		asm.StoreMem(asm.RFP, -8, asm.R0, asm.DWord),
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.Mov.Imm(asm.R2, 12),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, -8),
		asm.Mov.Imm(asm.R4, 1),
		asm.FnSkbLoadBytes.Call(),
		asm.JNE.Imm(asm.R0, 0, "count"),
		asm.LoadMem(asm.R0, asm.RFP, -8, asm.Byte),
		asm.RSh.Imm(asm.R0, 4),
		asm.LSh.Imm(asm.R0, 2),
		asm.Sub.Reg(asm.R7, asm.R0),
		// counts[0] += payload
		asm.Mov.Imm(asm.R0, 0).WithSymbol("count"),
		asm.StoreMem(asm.RFP, -4, asm.R0, asm.Word),
	}
	insns = append(insns, mapAdd(mapFD, -4, asm.R7, "keep")...)
	insns = append(insns, // counts[1] += 1 (R8: callee-saved, kept across the lookup)
		asm.Mov.Imm(asm.R0, 1),
		asm.StoreMem(asm.RFP, -4, asm.R0, asm.Word),
		asm.Mov.Imm(asm.R8, 1))
	insns = append(insns, mapAdd(mapFD, -4, asm.R8, "keep")...)
	return append(insns,
		asm.Mov.Imm32(asm.R0, -1).WithSymbol("keep"),
		asm.Return())
}

// mapAdd adds register v (callee-saved: R6–R9) to the map value whose key
// is at fp+keyOff, jumping to skip when the key has no value.
func mapAdd(mapFD int, keyOff int16, v asm.Register, skip string) asm.Instructions {
	insns := asm.Instructions{
		asm.LoadMapPtr(asm.R1, mapFD),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, int32(keyOff)),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, skip),
	}
	return append(insns, asm.StoreXAdd(asm.R0, v, asm.DWord))
}

// Read returns the payload bytes and segments counted so far.
func (f *RxFilter) Read() (bytes, segments uint64, err error) {
	if err := f.counts.Lookup(uint32(0), &bytes); err != nil {
		return 0, 0, err
	}
	if err := f.counts.Lookup(uint32(1), &segments); err != nil {
		return 0, 0, err
	}
	return bytes, segments, nil
}

// Close releases the program and its map (the socket keeps its own
// reference until it closes).
func (f *RxFilter) Close() error {
	return errors.Join(f.prog.Close(), f.counts.Close())
}

// RetransProbe counts TCP retransmissions (tcp:tcp_retransmit_skb, as a raw
// tracepoint: no tracefs needed) on the sockets whose local ports it watches.
// It counts retransmitted skbs, which with GSO may each hold many MSS-sized
// segments (TCP_INFO's total_retrans counts those).
type RetransProbe struct {
	prog  *ebpf.Program
	ports *ebpf.Map // local port (u16) → retransmitted segments
	link  link.Link
}

// NewRetransProbe loads the probe; Watch adds sockets.
func NewRetransProbe() (*RetransProbe, error) {
	if err := BPFAvailable(); err != nil {
		return nil, err
	}
	off, err := skcNumOffset()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoBPF, err)
	}
	ports, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 2, ValueSize: 8, MaxEntries: 1024})
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoBPF, err)
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "glmtopo_retrans", Type: ebpf.RawTracepoint, License: "GPL",
		Instructions: retransInsns(ports.FD(), off),
	})
	if err != nil {
		ports.Close()
		return nil, fmt.Errorf("%w: load retransmit probe: %v", ErrNoBPF, err)
	}
	l, err := link.AttachRawTracepoint(link.RawTracepointOptions{Name: "tcp_retransmit_skb", Program: prog})
	if err != nil {
		prog.Close()
		ports.Close()
		return nil, fmt.Errorf("%w: attach tcp_retransmit_skb: %v", ErrNoBPF, err)
	}
	return &RetransProbe{prog: prog, ports: ports, link: l}, nil
}

// skcNumOffset finds struct sock's skc_num (the local port, host order) in
// the kernel's BTF: sock starts with sock_common __sk_common.
func skcNumOffset() (int32, error) {
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		return 0, err
	}
	var sc *btf.Struct
	if err := spec.TypeByName("sock_common", &sc); err != nil {
		return 0, err
	}
	var find func(s *btf.Struct, base uint32) (int32, bool)
	find = func(s *btf.Struct, base uint32) (int32, bool) {
		for _, m := range s.Members {
			off := base + uint32(m.Offset.Bytes())
			if m.Name == "skc_num" {
				return int32(off), true
			}
			if inner, ok := btf.UnderlyingType(m.Type).(*btf.Struct); ok && m.Name == "" {
				if o, ok := find(inner, off); ok {
					return o, true
				}
			}
			if inner, ok := btf.UnderlyingType(m.Type).(*btf.Union); ok && m.Name == "" {
				for _, um := range inner.Members {
					if um.Name == "skc_num" {
						return int32(off + uint32(um.Offset.Bytes())), true
					}
					if st, ok := btf.UnderlyingType(um.Type).(*btf.Struct); ok && um.Name == "" {
						if o, ok := find(st, off+uint32(um.Offset.Bytes())); ok {
							return o, true
						}
					}
				}
			}
		}
		return 0, false
	}
	if off, ok := find(sc, 0); ok {
		return off, nil
	}
	return 0, errors.New("sock_common has no skc_num in this kernel's BTF")
}

// retransInsns: sk = args[0]; port = *(u16*)(sk + off) via
// bpf_probe_read_kernel; ports[port]++ when present.
func retransInsns(mapFD int, off int32) asm.Instructions {
	insns := asm.Instructions{
		asm.LoadMem(asm.R3, asm.R1, 0, asm.DWord), // args[0]: struct sock *
		asm.Add.Imm(asm.R3, off),
		asm.Mov.Imm(asm.R0, 0),
		asm.StoreMem(asm.RFP, -8, asm.R0, asm.DWord),
		asm.Mov.Reg(asm.R1, asm.RFP),
		asm.Add.Imm(asm.R1, -8),
		asm.Mov.Imm(asm.R2, 2),
		asm.FnProbeReadKernel.Call(),
		asm.JNE.Imm(asm.R0, 0, "out"),
		asm.Mov.Imm(asm.R8, 1),
	}
	insns = append(insns, mapAdd(mapFD, -8, asm.R8, "out")...)
	return append(insns,
		asm.Mov.Imm(asm.R0, 0).WithSymbol("out"),
		asm.Return())
}

// Watch starts counting retransmissions of the socket bound to c's local port.
func (p *RetransProbe) Watch(c net.Conn) error {
	port, err := localPort(c)
	if err != nil {
		return err
	}
	return p.ports.Update(port, uint64(0), ebpf.UpdateNoExist)
}

// Count returns the retransmissions counted for c's local port.
func (p *RetransProbe) Count(c net.Conn) (uint64, error) {
	port, err := localPort(c)
	if err != nil {
		return 0, err
	}
	var n uint64
	err = p.ports.Lookup(port, &n)
	return n, err
}

// Unwatch stops counting c's port.
func (p *RetransProbe) Unwatch(c net.Conn) {
	if port, err := localPort(c); err == nil {
		p.ports.Delete(port)
	}
}

func localPort(c net.Conn) (uint16, error) {
	a, ok := c.LocalAddr().(*net.TCPAddr)
	if !ok {
		return 0, fmt.Errorf("not a TCP connection: %v", c.LocalAddr())
	}
	return uint16(a.Port), nil
}

// Close detaches the probe.
func (p *RetransProbe) Close() error {
	return errors.Join(p.link.Close(), p.prog.Close(), p.ports.Close())
}

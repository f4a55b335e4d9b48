package tcp

import (
	"bufio"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/glmtopo/glmtopo/transport"
	"github.com/glmtopo/glmtopo/transport/telemetry"
)

// Link is a transport.Link over two TCP connections, one per direction.
type Link struct {
	peer  string
	cfg   Config
	stats *telemetry.LinkStats
	wire  *wireCounters
	tx    sender
	rx    receiver

	closeOnce sync.Once
}

var _ transport.Link = (*Link)(nil)

func newLink(cfg Config, peer string, out, in *net.TCPConn, outHS, inHS handshakeResult) *Link {
	l := &Link{peer: peer, cfg: cfg, stats: telemetry.NewLinkStats("tcp", peer)}
	l.tx = sender{conn: out, codec: transport.NewCodec(cfg.Limits), stager: cfg.Stager}
	l.rx = receiver{conn: in, codec: transport.NewCodec(cfg.Limits), stager: cfg.RecvStager,
		br: bufio.NewReaderSize(in, 256<<10)}
	if outHS.frameMAC {
		l.tx.mac = hmac.New(sha256.New, outHS.macKey)
	}
	if inHS.frameMAC {
		l.rx.mac = hmac.New(sha256.New, inHS.macKey)
	}
	for _, c := range []*net.TCPConn{out, in} {
		c.SetNoDelay(true)
	}
	l.wire = attachWire(cfg, out, in)
	if cfg.Registry != nil {
		cfg.Registry.Add(l.stats, l.wire.read)
	}
	return l
}

// Peer is the peer's handshake name and address.
func (l *Link) Peer() string { return l.peer }

// Stats returns the link's user-space counters.
func (l *Link) Stats() *telemetry.LinkStats { return l.stats }

// Wire returns what the kernel counted on the link's sockets (TCP_INFO, and
// the eBPF socket filter where it is loaded).
func (l *Link) Wire() *telemetry.Wire { return l.wire.read() }

// Close closes both connections; blocked Sends and Recvs return at once.
func (l *Link) Close() error {
	l.closeOnce.Do(func() {
		l.tx.conn.Close()
		l.rx.conn.Close()
		l.wire.close()
		if l.cfg.Registry != nil {
			l.cfg.Registry.Remove(l.stats)
		}
	})
	return nil
}

// longAgo is a deadline in the past: it interrupts a blocked read or write.
var longAgo = time.Unix(1, 0)

// bindContext applies ctx's deadline to one direction of c (skipping the
// call when it is unchanged: the steady path with no deadline costs nothing)
// and, when ctx can be cancelled, interrupts the blocked call on
// cancellation. (A method value such as c.SetWriteDeadline would allocate.)
func bindContext(ctx context.Context, c *net.TCPConn, write bool, last *time.Time) (stop func() bool) {
	dl, _ := ctx.Deadline()
	if !dl.Equal(*last) {
		setDeadline(c, write, dl)
		*last = dl
	}
	if ctx.Done() == nil {
		return noStop
	}
	return context.AfterFunc(ctx, func() { setDeadline(c, write, longAgo) })
}

func setDeadline(c *net.TCPConn, write bool, t time.Time) {
	if write {
		c.SetWriteDeadline(t)
	} else {
		c.SetReadDeadline(t)
	}
}

func noStop() bool { return true }

// ctxErr prefers the context's error to the deadline error it caused.
func ctxErr(ctx context.Context, err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() != nil {
		return fmt.Errorf("%w (%v)", ctx.Err(), err)
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("%w (%v)", context.DeadlineExceeded, err)
	}
	return err
}

// sender owns the outgoing connection.
type sender struct {
	mu       sync.Mutex
	conn     *net.TCPConn
	codec    *transport.Codec
	stager   transport.Stager
	mac      hash.Hash
	seq      uint64
	prefix   [transport.PrefixBytes]byte
	tag      [macBytes]byte
	deadline time.Time   // last write deadline set
	vec      net.Buffers // reused iovec list
	tmp      net.Buffers // WriteTo consumes its receiver; this is the copy it eats
	small    []byte      // a small frame, contiguous
	broken   error
}

// Send writes m as one frame. A failure part-way through a frame leaves the
// stream unusable: the link reports it on every later Send.
func (l *Link) Send(ctx context.Context, m *transport.Message) error {
	s := &l.tx
	s.mu.Lock()
	defer s.mu.Unlock()
	start := time.Now()
	n, err := s.send(ctx, m)
	if err != nil {
		return &transport.Error{Op: "send", Peer: l.peer, Step: m.Header.Step, StepSet: true, Err: err}
	}
	l.stats.Sent(n, time.Since(start))
	return nil
}

func (s *sender) send(ctx context.Context, m *transport.Message) (int64, error) {
	if s.broken != nil {
		return 0, s.broken
	}
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	total, err := m.PayloadBytes(s.codec.Limits)
	if err != nil {
		return 0, err
	}
	hdr, err := s.codec.EncodeHeader(&m.Header)
	if err != nil {
		return 0, err
	}
	transport.PutPrefix(&s.prefix, len(hdr), total)
	stop := bindContext(ctx, s.conn, true, &s.deadline)
	defer func() {
		if ctx.Err() != nil {
			s.deadline = longAgo // AfterFunc may have set it
		}
	}()
	defer stop()
	if s.mac != nil {
		s.startMAC()
		s.mac.Write(s.prefix[:])
		s.mac.Write(hdr)
	}
	s.vec = append(s.vec[:0], s.prefix[:], hdr)
	device := false
	for i := range m.Payloads {
		if m.Payloads[i].Dev != 0 {
			device = true
			break
		}
		if s.mac != nil {
			s.mac.Write(m.Payloads[i].Host)
		}
		if len(m.Payloads[i].Host) > 0 {
			s.vec = append(s.vec, m.Payloads[i].Host)
		}
	}
	if device {
		err = s.sendStaged(m)
	} else {
		if s.mac != nil {
			s.vec = append(s.vec, s.mac.Sum(s.tag[:0]))
		}
		err = s.flush()
	}
	if err != nil {
		s.broken = fmt.Errorf("connection broken by an earlier failed send: %w", err)
		return 0, ctxErr(ctx, err)
	}
	return total, nil
}

func (s *sender) startMAC() {
	s.mac.Reset()
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], s.seq)
	s.seq++
	s.mac.Write(b[:])
}

// smallFrame is the size below which a frame is copied into one buffer and
// written with write(2) rather than writev: cheaper than gathering small
// pieces.
const smallFrame = 32 << 10

// flush writes the pending iovecs with writev.
func (s *sender) flush() error {
	var n int
	for _, b := range s.vec {
		n += len(b)
	}
	if n <= smallFrame && len(s.vec) > 1 {
		s.small = s.small[:0]
		for _, b := range s.vec {
			s.small = append(s.small, b...)
		}
		s.vec = s.vec[:0]
		_, err := s.conn.Write(s.small)
		return err
	}
	// The prefix and header go out in the same writev as the payloads.
	// (Writing them first on their own, so that a large payload started a
	// fresh segment, made no measurable difference to 1 MiB ping-pong or
	// 16 MiB streaming in interleaved runs on the loopback VM.)
	if len(s.vec) == 1 {
		// One payload: write(2) streamed large payloads faster than a
		// one-element writev in back-to-back runs here.
		_, err := s.conn.Write(s.vec[0])
		s.vec = s.vec[:0]
		return err
	}
	s.tmp = s.vec
	_, err := s.tmp.WriteTo(s.conn)
	s.tmp = nil
	s.vec = s.vec[:0]
	return err
}

// sendStaged writes a frame with device payloads: the prefix and header,
// then each payload in order, device ones chunk by chunk through the
// stager's page-locked slots (chunk k+1 copies while chunk k is written).
func (s *sender) sendStaged(m *transport.Message) error {
	if s.stager == nil {
		return errors.New("device payload but the link has no stager (no CUDA?)")
	}
	s.vec = s.vec[:2] // prefix and header; payloads go one by one
	if err := s.flush(); err != nil {
		return err
	}
	for i := range m.Payloads {
		b := &m.Payloads[i]
		if b.Dev == 0 {
			s.vec = append(s.vec, b.Host)
			if err := s.flush(); err != nil {
				return err
			}
			continue
		}
		if err := s.streamDevice(b.Dev, int(b.Bytes)); err != nil {
			return fmt.Errorf("payload %d: %w", i, err)
		}
	}
	if s.mac != nil {
		s.vec = append(s.vec, s.mac.Sum(s.tag[:0]))
		return s.flush()
	}
	return nil
}

func (s *sender) streamDevice(dev uintptr, n int) error {
	slots := s.stager.Slots()
	chunk := len(slots[0])
	issue := func(k int) error {
		off := k * chunk
		return s.stager.ToHost(k%len(slots), dev+uintptr(off), min(chunk, n-off))
	}
	if n == 0 {
		return nil
	}
	if err := issue(0); err != nil {
		return err
	}
	for k := 0; k*chunk < n; k++ {
		slot := k % len(slots)
		if err := s.stager.Wait(slot); err != nil {
			return err
		}
		if (k+1)*chunk < n {
			if err := issue(k + 1); err != nil {
				return err
			}
		}
		part := slots[slot][:min(chunk, n-k*chunk)]
		if s.mac != nil {
			s.mac.Write(part)
		}
		if _, err := s.conn.Write(part); err != nil {
			return err
		}
	}
	return nil
}

// receiver owns the incoming connection.
type receiver struct {
	mu       sync.Mutex
	conn     *net.TCPConn
	br       *bufio.Reader
	codec    *transport.Codec
	stager   transport.Stager
	mac      hash.Hash
	seq      uint64
	prefix   [transport.PrefixBytes]byte
	tag      [macBytes]byte
	want     [macBytes]byte
	hdr      []byte
	deadline time.Time // last read deadline set
	lastStep uint64
	broken   error
}

// Recv reads the next frame into m.
func (l *Link) Recv(ctx context.Context, m *transport.Message) error {
	r := &l.rx
	r.mu.Lock()
	defer r.mu.Unlock()
	var first time.Time
	n, stepKnown, err := r.recv(ctx, m, &first)
	if err != nil {
		step := r.lastStep
		if stepKnown {
			step = m.Header.Step
		}
		return &transport.Error{Op: "recv", Peer: l.peer, Step: step, StepSet: stepKnown, Err: err}
	}
	r.lastStep = m.Header.Step
	l.stats.Received(n, time.Since(first))
	return nil
}

func (r *receiver) recv(ctx context.Context, m *transport.Message, first *time.Time) (n int64, stepKnown bool, err error) {
	if r.broken != nil {
		return 0, false, r.broken
	}
	if err := ctx.Err(); err != nil {
		return 0, false, err
	}
	stop := bindContext(ctx, r.conn, false, &r.deadline)
	defer func() {
		if ctx.Err() != nil {
			r.deadline = longAgo // AfterFunc may have set it
		}
	}()
	defer stop()
	got, err := io.ReadFull(r.br, r.prefix[:])
	*first = time.Now()
	if err != nil {
		if got > 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
			r.broken = fmt.Errorf("connection broken: %w", err)
		}
		if errors.Is(err, io.EOF) {
			err = fmt.Errorf("peer closed the connection: %w", err)
		}
		return 0, false, ctxErr(ctx, err)
	}
	n, stepKnown, err = r.frame(m)
	if err != nil {
		r.broken = fmt.Errorf("connection broken: %w", err)
		return 0, stepKnown, ctxErr(ctx, err)
	}
	return n, true, nil
}

// frame reads the rest of a frame whose prefix is in r.prefix.
func (r *receiver) frame(m *transport.Message) (int64, bool, error) {
	hl, total, err := r.codec.ParsePrefix(&r.prefix)
	if err != nil {
		return 0, false, err
	}
	r.hdr = grow(r.hdr, hl)
	if _, err := io.ReadFull(r.br, r.hdr); err != nil {
		return 0, false, unexpected(err)
	}
	if err := r.codec.DecodeHeader(r.hdr, &m.Header); err != nil {
		return 0, false, err
	}
	if err := r.codec.CheckPayload(&m.Header, total); err != nil {
		return 0, true, err
	}
	if r.mac != nil {
		r.mac.Reset()
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], r.seq)
		r.seq++
		r.mac.Write(b[:])
		r.mac.Write(r.prefix[:])
		r.mac.Write(r.hdr)
	}
	if err := r.payloads(m); err != nil {
		return 0, true, err
	}
	if r.mac != nil {
		if _, err := io.ReadFull(r.br, r.tag[:]); err != nil {
			return 0, true, unexpected(err)
		}
		if !hmac.Equal(r.tag[:], r.mac.Sum(r.want[:0])) {
			return 0, true, errors.New("frame MAC mismatch: the frame was altered on the wire")
		}
	}
	return total, true, nil
}

func (r *receiver) payloads(m *transport.Message) error {
	ts := m.Header.Tensors
	if cap(m.Payloads) < len(ts) {
		m.Payloads = append(m.Payloads[:cap(m.Payloads)], make([]transport.Buffer, len(ts)-cap(m.Payloads))...)
	}
	m.Payloads = m.Payloads[:len(ts)]
	for i := range ts {
		b := &m.Payloads[i]
		n := ts[i].Bytes
		if b.Dev != 0 {
			if b.Bytes < n {
				return fmt.Errorf("payload %d: %d bytes arrive, the device buffer holds %d", i, n, b.Bytes)
			}
			if err := r.readDevice(b.Dev, int(n)); err != nil {
				return fmt.Errorf("payload %d: %w", i, err)
			}
			b.Bytes = n
			continue
		}
		b.Host = grow(b.Host, int(n))
		if _, err := io.ReadFull(r.br, b.Host); err != nil {
			return fmt.Errorf("payload %d: %w", i, unexpected(err))
		}
		if r.mac != nil {
			r.mac.Write(b.Host)
		}
	}
	return nil
}

// readDevice reads n bytes from the wire into device memory at dev through
// the staging slots: the copy of chunk k overlaps the read of chunk k+1.
func (r *receiver) readDevice(dev uintptr, n int) error {
	if r.stager == nil {
		return errors.New("device destination but the link has no stager (no CUDA?)")
	}
	slots := r.stager.Slots()
	chunk := len(slots[0])
	for k := 0; k*chunk < n; k++ {
		slot := k % len(slots)
		if k >= len(slots) {
			if err := r.stager.Wait(slot); err != nil {
				return err
			}
		}
		part := slots[slot][:min(chunk, n-k*chunk)]
		if _, err := io.ReadFull(r.br, part); err != nil {
			return unexpected(err)
		}
		if r.mac != nil {
			r.mac.Write(part)
		}
		if err := r.stager.ToDevice(slot, dev+uintptr(k*chunk), len(part)); err != nil {
			return err
		}
	}
	for s := range slots {
		if err := r.stager.Wait(s); err != nil {
			return err
		}
	}
	return nil
}

func unexpected(err error) error {
	if errors.Is(err, io.EOF) {
		return fmt.Errorf("peer closed mid-message: %w", io.ErrUnexpectedEOF)
	}
	return err
}

func grow[T any](v []T, n int) []T {
	if cap(v) >= n {
		return v[:n]
	}
	return make([]T, n)
}

// Package tcp is the TCP transport.Link: one connection per direction,
// frames written with writev (net.Buffers) and TCP_NODELAY, both ends
// authenticated with the cluster key before any frame moves, device
// payloads staged through page-locked buffers.
//
// The data plane is authenticated, not encrypted: a peer without the
// cluster key cannot connect, and learns nothing from trying, but an
// eavesdropper on the path sees the tensors (as with NCCL's own sockets):
// run it on the cluster's private network. Config.FrameMAC also protects
// established connections against injected bytes.
//
// One side dials (Dial) and opens both connections; the other accepts
// (Acceptor), pairing the two connections of a dial by their session id. A
// restarted peer dials again with a new session and the acceptor hands out
// a new Link.
package tcp

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/glmtopo/glmtopo/transport"
	"github.com/glmtopo/glmtopo/transport/telemetry"
)

// Config is shared by both ends.
type Config struct {
	Name   string // this endpoint's name, sent in the handshake (1…64 bytes)
	Key    []byte // the cluster key (32 bytes, as node.LoadClusterKey reads it)
	Limits transport.Limits
	// FrameMAC adds an HMAC-SHA256 over every frame (either end can ask
	// for it): without it only the handshake is authenticated, which keeps
	// keyless peers out but not an on-path attacker who can inject bytes
	// into an established connection.
	FrameMAC bool
	// Stager moves device payloads that Send gets, RecvStager those Recv
	// writes (two, so a send and a receive can overlap); nil: host only.
	Stager, RecvStager transport.Stager
	HandshakeTimeout   time.Duration // 0: 10 s
	Logger             *slog.Logger
	Registry           *telemetry.Registry // optional: links register here
	// Dial opens connections (nil: net.Dialer); tests dial from inside a
	// network namespace with it.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// WireCounters loads the eBPF socket filter on the link's sockets when
	// the process may (root and BTF); TCP_INFO is read either way.
	WireCounters bool
}

func (c *Config) check() error {
	if len(c.Key) < 16 {
		return fmt.Errorf("tcp link: a cluster key is required (got %d bytes)", len(c.Key))
	}
	if err := checkName(c.Name); err != nil {
		return err
	}
	if c.Limits.MaxMessageBytes == 0 {
		c.Limits = transport.DefaultLimits()
	}
	if c.HandshakeTimeout == 0 {
		c.HandshakeTimeout = 10 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}

// Dial connects to an Acceptor at addr: two connections, both
// authenticated. It retries refused connections until ctx ends (the peer may
// not be up yet), and the error then says who was missing.
func Dial(ctx context.Context, addr string, cfg Config) (*Link, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	var session [sessionIDBytes]byte
	rand.Read(session[:])
	var conns [2]*net.TCPConn
	var hs [2]handshakeResult
	for i, toDialer := range []bool{false, true} {
		c, r, err := dialOne(ctx, addr, cfg, session, toDialer)
		if err != nil {
			if conns[0] != nil {
				conns[0].Close()
			}
			return nil, err
		}
		conns[i], hs[i] = c, r
	}
	peer := fmt.Sprintf("%s (%s)", hs[0].peerName, addr)
	return newLink(cfg, peer, conns[0], conns[1], hs[0], hs[1]), nil
}

func dialOne(ctx context.Context, addr string, cfg Config, session [sessionIDBytes]byte, toDialer bool) (*net.TCPConn, handshakeResult, error) {
	dial := cfg.Dial
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	backoff := 20 * time.Millisecond
	for {
		c, err := dial(ctx, "tcp", addr)
		if err == nil {
			tc := c.(*net.TCPConn)
			dl, ok := ctx.Deadline()
			tc.SetDeadline(deadlineFor(dl, ok, cfg.HandshakeTimeout))
			r, err := dialHandshake(tc, cfg.Key, cfg.Name, session, toDialer, cfg.FrameMAC)
			if err != nil {
				tc.Close()
				return nil, r, fmt.Errorf("tcp link to %s: %w", addr, err)
			}
			tc.SetDeadline(time.Time{})
			return tc, r, nil
		}
		select {
		case <-ctx.Done():
			return nil, handshakeResult{}, fmt.Errorf("tcp link to %s: peer unreachable until %v: %w", addr, ctx.Err(), err)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, time.Second)
	}
}

// Acceptor authenticates incoming connections and pairs them into Links.
type Acceptor struct {
	cfg   Config
	ln    net.Listener
	links chan *Link

	mu      sync.Mutex
	pending map[[sessionIDBytes]byte]*halfLink
	closed  bool
	wg      sync.WaitGroup
}

type halfLink struct {
	conn  *net.TCPConn
	hs    handshakeResult
	timer *time.Timer
}

// Listen starts accepting on addr ("host:port"; port 0 picks one).
func Listen(addr string, cfg Config) (*Acceptor, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("tcp link listen: %w", err)
	}
	return NewAcceptor(ln, cfg)
}

// NewAcceptor accepts links on an existing listener (which it closes).
func NewAcceptor(ln net.Listener, cfg Config) (*Acceptor, error) {
	if err := cfg.check(); err != nil {
		ln.Close()
		return nil, err
	}
	a := &Acceptor{cfg: cfg, ln: ln, links: make(chan *Link, 4), pending: map[[sessionIDBytes]byte]*halfLink{}}
	a.wg.Add(1)
	go a.serve()
	return a, nil
}

// Addr is the listening address.
func (a *Acceptor) Addr() net.Addr { return a.ln.Addr() }

// Accept returns the next authenticated link, or an error when ctx ends.
func (a *Acceptor) Accept(ctx context.Context) (*Link, error) {
	select {
	case l, ok := <-a.links:
		if !ok {
			return nil, transport.ErrClosed
		}
		return l, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("tcp link: no peer connected to %s: %w", a.ln.Addr(), ctx.Err())
	}
}

// Close stops accepting and closes half-formed links (formed ones stay).
func (a *Acceptor) Close() error {
	err := a.ln.Close()
	a.mu.Lock()
	a.closed = true
	for id, h := range a.pending {
		h.timer.Stop()
		h.conn.Close()
		delete(a.pending, id)
	}
	a.mu.Unlock()
	a.wg.Wait()
	close(a.links)
	for l := range a.links {
		l.Close()
	}
	return err
}

func (a *Acceptor) serve() {
	defer a.wg.Done()
	for {
		c, err := a.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			a.cfg.Logger.Warn("tcp link accept", "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			a.handshake(c.(*net.TCPConn))
		}()
	}
}

func (a *Acceptor) handshake(c *net.TCPConn) {
	c.SetDeadline(time.Now().Add(a.cfg.HandshakeTimeout))
	r, err := acceptHandshake(c, a.cfg.Key, a.cfg.Name, a.cfg.FrameMAC)
	if err != nil {
		a.cfg.Logger.Warn("tcp link: refused a connection", "from", c.RemoteAddr().String(), "err", err)
		c.Close()
		return
	}
	c.SetDeadline(time.Time{})
	a.pair(c, r)
}

// pair matches the two connections of one dial; a half whose twin does not
// arrive within the handshake timeout is dropped.
func (a *Acceptor) pair(c *net.TCPConn, r handshakeResult) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		c.Close()
		return
	}
	other, ok := a.pending[r.session]
	if !ok || other.hs.toDialer == r.toDialer {
		if ok {
			other.timer.Stop()
			other.conn.Close()
		}
		h := &halfLink{conn: c, hs: r}
		session := r.session
		h.timer = time.AfterFunc(a.cfg.HandshakeTimeout, func() {
			a.mu.Lock()
			if a.pending[session] == h {
				delete(a.pending, session)
				h.conn.Close()
			}
			a.mu.Unlock()
		})
		a.pending[r.session] = h
		return
	}
	other.timer.Stop()
	delete(a.pending, r.session)
	in, out := other, &halfLink{conn: c, hs: r}
	if in.hs.toDialer {
		in, out = out, in
	}
	peer := fmt.Sprintf("%s (%s)", r.peerName, c.RemoteAddr())
	l := newLink(a.cfg, peer, out.conn, in.conn, out.hs, in.hs)
	select {
	case a.links <- l:
	default:
		a.cfg.Logger.Warn("tcp link: dropped a link nobody accepted", "peer", peer)
		l.Close()
	}
}

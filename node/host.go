package node

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/connmgr"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/pnet"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	ipnet "github.com/libp2p/go-libp2p/p2p/net/pnet"
	"github.com/libp2p/go-libp2p/p2p/security/noise"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	"github.com/libp2p/go-libp2p/x/rate"
	ma "github.com/multiformats/go-multiaddr"
	mss "github.com/multiformats/go-multistream"
)

// mdnsServiceName is the DNS-SD service the daemons announce; it differs
// from libp2p's default so glmtopo daemons ignore unrelated libp2p nodes.
const mdnsServiceName = "_glmtopo._udp"

// newHost builds the libp2p host: TCP only (pnet cannot protect QUIC,
// WebTransport or WebRTC, so none are enabled), noise security, the private
// network key, no relay, no NAT port mapping, no hole punching, no AutoNAT
// and no bootstrap peers. SO_REUSEPORT is off: with it, a second daemon on
// the same --listen port binds too and the kernel splits the connections
// between them; without it, the port in use is an error at start.
func newHost(key crypto.PrivKey, psk pnet.PSK, listen []ma.Multiaddr, gater connmgr.ConnectionGater) (host.Host, error) {
	if err := checkListenFree(listen); err != nil {
		return nil, err
	}
	rm, err := newResourceManager()
	if err != nil {
		return nil, err
	}
	return libp2p.New(
		libp2p.Identity(key),
		libp2p.ResourceManager(rm), // the host closes it
		libp2p.ConnectionGater(gater),
		libp2p.ListenAddrs(listen...),
		libp2p.PrivateNetwork(psk),
		libp2p.Transport(tcp.NewTCPTransport, tcp.DisableReuseport()),
		libp2p.Security(noise.ID, noise.New),
		libp2p.DisableRelay(),
		libp2p.UserAgent("glmtopo"),
		libp2p.DisableMetrics(),
	)
}

// newResourceManager is libp2p's default resource manager without its
// per-IP connection rate limit (0.2 new connections a second after a burst
// of 16, counting outbound dials too, loopback exempt). The daemon redials a
// dead member every heartbeat, which drains that member's bucket within
// seconds; the member's own connections are then refused when it restarts,
// and the redials keep the bucket empty: it could never rejoin (seen across
// network namespaces, TestEmulatedHostsNodeLoss in cmd/glmtopo). The private
// network key already keeps strangers out.
func newResourceManager() (network.ResourceManager, error) {
	limits := rcmgr.DefaultLimits
	libp2p.SetDefaultServiceLimits(&limits)
	rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(limits.AutoScale()),
		rcmgr.WithConnRateLimiters(&rate.Limiter{})) // zero limits: no rate limit
	if err != nil {
		return nil, fmt.Errorf("libp2p resource manager: %w", err)
	}
	return rm, nil
}

// checkListenFree binds each fixed TCP listen port once, without
// SO_REUSEPORT, and releases it: a port another process holds (a daemon
// started with SO_REUSEPORT included) fails here with its address named.
func checkListenFree(listen []ma.Multiaddr) error {
	for _, a := range listen {
		network, hostport, err := dialArgs(a)
		if err != nil {
			continue // not a TCP address; libp2p reports it
		}
		if _, port, _ := net.SplitHostPort(hostport); port == "0" {
			continue
		}
		ln, err := net.Listen(network, hostport)
		if err != nil {
			if errors.Is(err, syscall.EADDRINUSE) {
				return fmt.Errorf("listen %s: the address is already in use (another glmtopo node or program holds it; stop it or choose another --listen port)", hostport)
			}
			return fmt.Errorf("listen %s: %w", hostport, err)
		}
		ln.Close()
	}
	return nil
}

// parseHostAddr accepts a multiaddr ("/ip4/10.0.0.2/tcp/7946[/p2p/ID]") or
// host:port ("10.0.0.2:7946", "[fe80::1]:7946", "gpu-a:7946").
func parseHostAddr(s string) (ma.Multiaddr, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, fmt.Errorf("empty address")
	}
	if strings.HasPrefix(s, "/") {
		a, err := ma.NewMultiaddr(s)
		if err != nil {
			return nil, fmt.Errorf("address %q: %w", s, err)
		}
		return a, nil
	}
	h, p, err := net.SplitHostPort(s)
	if err != nil {
		return nil, fmt.Errorf("address %q: want host:port or a multiaddr: %w", s, err)
	}
	port, err := strconv.ParseUint(p, 10, 16)
	if err != nil {
		return nil, fmt.Errorf("address %q: bad port %q", s, p)
	}
	var proto string
	switch ip := net.ParseIP(h); {
	case h == "":
		h, proto = "0.0.0.0", "ip4"
	case ip == nil:
		proto = "dns"
	case ip.To4() != nil:
		proto = "ip4"
	default:
		proto = "ip6"
	}
	return ma.NewMultiaddr(fmt.Sprintf("/%s/%s/tcp/%d", proto, h, port))
}

// staticPeer is one --peers entry. ID is empty until learnt by probing when
// the entry did not carry /p2p/.
type staticPeer struct {
	spec   string
	addr   ma.Multiaddr // without /p2p/
	id     peer.ID
	pinned bool // the entry named its peer id; otherwise it is probed on every dial
	next   time.Time
	wait   time.Duration
}

func parseStaticPeer(spec string) (*staticPeer, error) {
	a, err := parseHostAddr(spec)
	if err != nil {
		return nil, fmt.Errorf("peer %w", err)
	}
	sp := &staticPeer{spec: spec, addr: a}
	if tpt, id := peer.SplitAddr(a); id != "" {
		sp.addr, sp.id, sp.pinned = tpt, id, true
	}
	return sp, nil
}

// probePeerID learns the peer id behind a plain address: it opens a TCP
// connection, applies the private-network key, negotiates noise and reads the
// authenticated remote identity, then hangs up. A listener without our
// cluster key fails here, exactly as it would for a full dial.
func probePeerID(ctx context.Context, key crypto.PrivKey, psk pnet.PSK, addr ma.Multiaddr) (peer.ID, error) {
	network, hostport, err := dialArgs(addr)
	if err != nil {
		return "", err
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, network, hostport)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	pc, err := ipnet.NewProtectedConn(psk, c)
	if err != nil {
		return "", err
	}
	if err := mss.SelectProtoOrFail(noise.ID, pc); err != nil {
		return "", fmt.Errorf("negotiate security with %s: %w", addr, err)
	}
	tpt, err := noise.New(noise.ID, key, nil)
	if err != nil {
		return "", err
	}
	probe, err := tpt.WithSessionOptions(noise.DisablePeerIDCheck())
	if err != nil {
		return "", err
	}
	sc, err := probe.SecureOutbound(ctx, pc, "")
	if err != nil {
		return "", fmt.Errorf("handshake with %s (wrong cluster key?): %w", addr, err)
	}
	defer sc.Close()
	return sc.RemotePeer(), nil
}

// dialArgs turns /ip4|ip6|dns*/H/tcp/P into net.Dial arguments.
func dialArgs(a ma.Multiaddr) (string, string, error) {
	var h, p string
	for _, c := range a {
		switch c.Protocol().Code {
		case ma.P_IP4, ma.P_IP6, ma.P_DNS, ma.P_DNS4, ma.P_DNS6:
			h = c.Value()
		case ma.P_TCP:
			p = c.Value()
		}
	}
	if h == "" || p == "" {
		return "", "", fmt.Errorf("address %s: need an IP or DNS name and a TCP port", a)
	}
	return "tcp", net.JoinHostPort(h, p), nil
}

// forceDial connects even if the swarm's dial backoff would refuse: a
// restarted peer must be reachable again at once.
func forceDial(ctx context.Context, h host.Host, info peer.AddrInfo) error {
	return h.Connect(network.WithForceDirectDial(ctx, "glmtopo membership"), info)
}

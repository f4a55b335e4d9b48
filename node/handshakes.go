package node

import (
	"net"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/control"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

// maxPendingHandshakes bounds the inbound connections watched at once (a
// port scan must not grow the map without bound).
const maxPendingHandshakes = 4096

// handshakeWatch is a connection gater that admits everything and notices
// inbound connections that never finish the secure handshake. A host with
// another cluster key (or none) sends bytes that the private-network layer
// turns to garbage, and libp2p drops the connection without a word; the
// daemon reports those hosts at info level instead.
type handshakeWatch struct {
	mu      sync.Mutex
	pending map[string]pendingConn // by remote multiaddr
}

type pendingConn struct {
	host string
	at   time.Time
}

func newHandshakeWatch() *handshakeWatch {
	return &handshakeWatch{pending: map[string]pendingConn{}}
}

func (w *handshakeWatch) InterceptPeerDial(peer.ID) bool               { return true }
func (w *handshakeWatch) InterceptAddrDial(peer.ID, ma.Multiaddr) bool { return true }
func (w *handshakeWatch) InterceptUpgraded(network.Conn) (bool, control.DisconnectReason) {
	return true, 0
}

func (w *handshakeWatch) InterceptAccept(a network.ConnMultiaddrs) bool {
	remote := a.RemoteMultiaddr()
	host := remote.String()
	if na, err := manet.ToNetAddr(remote); err == nil {
		if h, _, err := net.SplitHostPort(na.String()); err == nil {
			host = h
		}
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.pending) < maxPendingHandshakes {
		w.pending[remote.String()] = pendingConn{host: host, at: time.Now()}
	}
	return true
}

func (w *handshakeWatch) InterceptSecured(dir network.Direction, _ peer.ID, a network.ConnMultiaddrs) bool {
	if dir == network.DirInbound {
		w.mu.Lock()
		delete(w.pending, a.RemoteMultiaddr().String())
		w.mu.Unlock()
	}
	return true
}

// failed returns, and forgets, the hosts of inbound connections accepted
// more than after ago that never completed the handshake.
func (w *handshakeWatch) failed(now time.Time, after time.Duration) []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var hosts []string
	for k, p := range w.pending {
		if now.Sub(p.at) > after {
			hosts = append(hosts, p.host)
			delete(w.pending, k)
		}
	}
	return hosts
}

// reportFailedHandshakes logs, once a minute per host, the hosts whose
// connections failed the secure handshake.
func (d *Daemon) reportFailedHandshakes(now time.Time) {
	counts := map[string]int{}
	for _, h := range d.handshakes.failed(now, 2*d.opts.HeartbeatInterval+time.Second) {
		counts[h]++
	}
	for host, n := range counts {
		ok, suppressed := d.peerLogs.allow("handshake " + host)
		if !ok {
			continue
		}
		d.log.Info("a host failed the secure handshake: it uses another --cluster-key-file, or is not a glmtopo daemon",
			"from", host, "connections", n+suppressed)
	}
}

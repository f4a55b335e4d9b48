package node

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	"github.com/libp2p/go-libp2p/p2p/discovery/mdns"
	ma "github.com/multiformats/go-multiaddr"
)

// Daemon is one running glmtopo node.
type Daemon struct {
	opts  Options
	log   *slog.Logger
	host  host.Host
	lock  *stateDirLock
	self  helloMsg
	model ModelRef
	start time.Time

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	fatal  chan error // a peer refused us (duplicate identity)

	activeNotify chan struct{} // wakes deliverActive

	mdns    interface{ Close() error }
	control *http.Server
	// peerLogs rate-limits the info lines about peers we cannot reach.
	peerLogs   *logLimiter
	handshakes *handshakeWatch // inbound connections that never authenticate

	mu           sync.Mutex
	members      map[peer.ID]*member // includes self
	connInstance map[network.Conn]string
	hellos       map[network.Conn]bool // hello exchange in flight
	static       []*staticPeer
	redial       map[peer.ID]time.Time
	events       []Event
	seq          uint64
	changedAt    time.Time // last change of the live member set
	active       *ClusterPlan
	activeAt     time.Time // when active became active here
	broken       []string  // why the active plan no longer holds even if membership matches again
	pending      *ClusterPlan
	maxEpoch     uint64
	coordReason  string
	proposing    bool
	retryAt      time.Time
	commitSentAt map[peer.ID]time.Time
	// noPlan is the live set (coordView.liveKey) the planner last found no
	// plan for, and why: a planner is a function of the members, so the
	// coordinator asks again only when the live set changes.
	noPlan, noPlanWhy string
}

// Health of a member as the failure detector sees it.
const (
	HealthAlive   = "alive"
	HealthSuspect = "suspect"
	HealthDead    = "dead"
)

type member struct {
	id          peer.ID
	hello       helloMsg
	joinedAt    time.Time
	lastSeen    time.Time
	health      string
	deadReason  string
	activeEpoch uint64
	maxEpoch    uint64
	lostAt      time.Time   // when it last went dead or left
	stage       memberStage // its last heartbeat's stage report
}

// Event is a membership or plan change, kept for status.
type Event struct {
	Time   time.Time `json:"time"`
	Kind   string    `json:"kind"` // join, suspect, alive, dead, leave, reject, plan
	Peer   string    `json:"peer,omitempty"`
	Name   string    `json:"name,omitempty"`
	Detail string    `json:"detail,omitempty"`
}

const maxEvents = 64

// Start brings a daemon up: it locks the state dir, loads (or creates) the
// node key, detects the inventory, listens, serves the control socket and
// begins discovery.
func Start(ctx context.Context, opts Options) (d *Daemon, err error) {
	if err := opts.setDefaults(); err != nil {
		return nil, err
	}
	listen := make([]ma.Multiaddr, 0, len(opts.Listen))
	for _, l := range opts.Listen {
		a, err := parseHostAddr(l)
		if err != nil {
			return nil, fmt.Errorf("listen %w", err)
		}
		listen = append(listen, a)
	}
	var static []*staticPeer
	for _, p := range opts.Peers {
		sp, err := parseStaticPeer(p)
		if err != nil {
			return nil, err
		}
		static = append(static, sp)
	}
	sock := filepath.Join(opts.StateDir, controlSockName)
	if len(sock) > 104 {
		return nil, fmt.Errorf("state dir %s: control socket path is %d bytes, the limit is 104; use a shorter --state-dir", opts.StateDir, len(sock))
	}
	hash, err := opts.ResolveModel(opts.Model)
	if err != nil {
		return nil, fmt.Errorf("model %s: %w", opts.Model, err)
	}
	lock, err := lockStateDir(opts.StateDir)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			lock.Close()
		}
	}()
	key, err := loadOrCreateNodeKey(opts.StateDir)
	if err != nil {
		return nil, err
	}
	var inv HostInventory
	if opts.Inventory != nil {
		inv = *opts.Inventory
	} else if inv, err = (InventorySource{}).Detect(ctx); err != nil {
		return nil, fmt.Errorf("inventory: %w", err)
	}
	if opts.Name == "" {
		opts.Name = inv.Hostname
	}
	handshakes := newHandshakeWatch()
	h, err := newHost(key, opts.PSK, listen, handshakes)
	if err != nil {
		return nil, fmt.Errorf("libp2p host: %w", err)
	}
	inst := make([]byte, 8)
	rand.Read(inst)
	dctx, cancel := context.WithCancel(context.Background())
	d = &Daemon{
		opts: opts, host: h, lock: lock, start: time.Now(),
		log:          opts.Logger.With("node", opts.Name),
		model:        ModelRef{Ref: opts.Model, ConfigHash: hash},
		ctx:          dctx,
		cancel:       cancel,
		fatal:        make(chan error, 1),
		activeNotify: make(chan struct{}, 1),
		members:      map[peer.ID]*member{},
		connInstance: map[network.Conn]string{},
		hellos:       map[network.Conn]bool{},
		static:       static,
		redial:       map[peer.ID]time.Time{},
		commitSentAt: map[peer.ID]time.Time{},
		peerLogs:     newLogLimiter(peerLogInterval, time.Now),
		handshakes:   handshakes,
	}
	d.self = helloMsg{
		Version: wireVersion, ID: h.ID().String(), Instance: hex.EncodeToString(inst),
		Name: opts.Name, Head: opts.Head, Model: d.model, Inventory: inv, DataAddr: opts.DataAddr,
	}
	d.self.Addrs = d.advertisedAddrs()
	d.members[h.ID()] = &member{id: h.ID(), hello: d.self, joinedAt: d.start, lastSeen: d.start, health: HealthAlive}
	d.changedAt = d.start
	opts.Stages.setView(func() []StageStatus { return d.Status().Stages })

	h.SetStreamHandler(protoHello, d.handleHello)
	h.SetStreamHandler(protoHeartbeat, d.handleHeartbeat)
	h.SetStreamHandler(protoPlan, d.handlePlan)
	h.SetStreamHandler(protoLeave, d.handleLeave)
	h.Network().Notify(&network.NotifyBundle{
		ConnectedF: func(_ network.Network, c network.Conn) { d.goHello(c) },
		DisconnectedF: func(_ network.Network, c network.Conn) {
			d.mu.Lock()
			delete(d.connInstance, c)
			d.mu.Unlock()
		},
	})
	if err := d.serveControl(sock); err != nil {
		h.Close()
		cancel()
		return nil, err
	}
	if opts.MDNS {
		svc := mdns.NewMdnsService(h, mdnsServiceName, mdnsNotifee{d})
		if err := svc.Start(); err != nil {
			// No multicast-capable interface is not fatal: static peers still work.
			d.log.Warn("mDNS discovery unavailable", "err", err)
		} else {
			d.mdns = svc
		}
	}
	d.log.Info("node started", "id", h.ID().String(), "addrs", d.self.Addrs, "state_dir", opts.StateDir,
		"model", opts.Model, "config_hash", short(hash), "gpus", len(inv.GPUs), "control", sock)
	for _, c := range h.Network().Conns() { // connections that raced the notifier
		d.goHello(c)
	}
	if opts.OnActive != nil {
		d.wg.Add(1)
		go d.deliverActive()
	}
	d.wg.Add(1)
	go d.loop()
	return d, nil
}

// ID is this daemon's peer id.
func (d *Daemon) ID() peer.ID { return d.host.ID() }

// Addrs are the addresses other hosts can dial, with /p2p/<id>.
func (d *Daemon) Addrs() []string { return d.advertisedAddrs() }

func (d *Daemon) advertisedAddrs() []string {
	var out []string
	for _, a := range d.host.Addrs() {
		out = append(out, a.String()+"/p2p/"+d.host.ID().String())
	}
	sort.Strings(out)
	return out
}

// Wait blocks until ctx ends (then shuts down cleanly) or a peer refuses this
// daemon; it returns the refusal.
func (d *Daemon) Wait(ctx context.Context) error {
	select {
	case <-ctx.Done():
		d.Close()
		return nil
	case err := <-d.fatal:
		d.Close()
		return err
	}
}

// Close tells the members this host is leaving and stops everything.
func (d *Daemon) Close() error {
	if d.ctx.Err() != nil {
		return nil
	}
	d.sendLeave()
	d.cancel()
	d.wg.Wait()
	if d.mdns != nil {
		d.mdns.Close()
	}
	if d.control != nil {
		d.control.Close()
		os.Remove(filepath.Join(d.opts.StateDir, controlSockName))
	}
	err := d.host.Close()
	d.lock.Close()
	return err
}

func (d *Daemon) loop() {
	defer d.wg.Done()
	t := time.NewTicker(d.opts.HeartbeatInterval)
	defer t.Stop()
	d.dialStatic()
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-t.C:
		}
		d.detectFailures(time.Now())
		d.sendHeartbeats()
		d.dialStatic()
		d.redialMembers()
		d.reportFailedHandshakes(time.Now())
		d.coordinate()
	}
}

func (d *Daemon) addEvent(kind string, id peer.ID, name, detail string) {
	d.events = append(d.events, Event{Time: time.Now().UTC(), Kind: kind, Peer: id.String(), Name: name, Detail: detail})
	if len(d.events) > maxEvents {
		d.events = d.events[len(d.events)-maxEvents:]
	}
}

// dialStatic connects to --peers entries that are not connected, with a
// per-entry backoff capped at 5 heartbeats.
func (d *Daemon) dialStatic() {
	now := time.Now()
	for _, sp := range d.static {
		d.mu.Lock()
		due := !now.Before(sp.next)
		id := sp.id
		d.mu.Unlock()
		if !due || (id != "" && d.host.Network().Connectedness(id) == network.Connected) {
			continue
		}
		d.mu.Lock()
		sp.wait = min(max(2*sp.wait, d.opts.HeartbeatInterval), 5*d.opts.HeartbeatInterval)
		sp.next = now.Add(sp.wait)
		d.mu.Unlock()
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			if err := d.dialStaticPeer(sp); err != nil {
				d.logUnreachable("static peer not reachable", sp.spec, err)
				return
			}
			d.peerLogs.reset(sp.spec)
			d.mu.Lock()
			sp.wait = 0
			d.mu.Unlock()
		}()
	}
}

func (d *Daemon) dialStaticPeer(sp *staticPeer) error {
	ctx, cancel := context.WithTimeout(d.ctx, 2*d.opts.HeartbeatInterval+time.Second)
	defer cancel()
	d.mu.Lock()
	id := sp.id
	d.mu.Unlock()
	if !sp.pinned {
		got, err := probePeerID(ctx, d.host.Peerstore().PrivKey(d.host.ID()), d.opts.PSK, sp.addr)
		if err != nil {
			return err
		}
		id = got
		d.mu.Lock()
		sp.id = got
		d.mu.Unlock()
	}
	if id == d.host.ID() {
		return nil // our own address in a shared peer list
	}
	return forceDial(ctx, d.host, peer.AddrInfo{ID: id, Addrs: []ma.Multiaddr{sp.addr}})
}

// redialMembers reconnects to known members that have no connection, e.g.
// learnt through gossip, or back after a network blip.
func (d *Daemon) redialMembers() {
	now := time.Now()
	var todo []peer.AddrInfo
	d.mu.Lock()
	for id, m := range d.members {
		if id == d.host.ID() || d.host.Network().Connectedness(id) == network.Connected || now.Before(d.redial[id]) {
			continue
		}
		wait := d.opts.HeartbeatInterval
		if m.health == HealthDead {
			wait = 5 * d.opts.HeartbeatInterval
		}
		d.redial[id] = now.Add(wait)
		todo = append(todo, peer.AddrInfo{ID: id, Addrs: toMultiaddrs(m.hello.Addrs)})
	}
	d.mu.Unlock()
	for _, info := range todo {
		d.connectAsync(info)
	}
}

func (d *Daemon) connectAsync(info peer.AddrInfo) {
	if info.ID == d.host.ID() || len(info.Addrs) == 0 {
		return
	}
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		// Two hosts that find each other at the same moment (mDNS) dial each
		// other from their listening ports: TCP simultaneous open makes one
		// connection on which both sides start the handshake as initiator, and
		// it fails. mDNS reports a peer once, so retry after a random delay,
		// which breaks the symmetry.
		for attempt := 1; ; attempt++ {
			ctx, cancel := context.WithTimeout(d.ctx, 2*d.opts.HeartbeatInterval+time.Second)
			err := forceDial(ctx, d.host, info)
			cancel()
			if err == nil || d.host.Network().Connectedness(info.ID) == network.Connected {
				return
			}
			d.log.Debug("dial failed", "peer", info.ID.String(), "attempt", attempt, "err", err)
			if attempt == dialAttempts {
				d.logUnreachable("peer not reachable", info.ID.String(), err)
				return
			}
			delay := time.Duration(attempt) * (50*time.Millisecond + mrand.N(250*time.Millisecond))
			select {
			case <-d.ctx.Done():
				return
			case <-time.After(delay):
			}
		}
	}()
}

// logUnreachable says at info level, once a minute per peer, that a peer
// cannot be reached, and why; the repeats in between are debug lines.
func (d *Daemon) logUnreachable(msg, peerName string, err error) {
	ok, suppressed := d.peerLogs.allow(msg + " " + peerName)
	if !ok {
		d.log.Debug(msg, "peer", peerName, "err", err)
		return
	}
	attrs := []any{"peer", peerName, "err", err}
	if suppressed > 0 {
		attrs = append(attrs, "failures_since_last_report", suppressed)
	}
	if msg := err.Error(); strings.Contains(msg, "negotiate security") || strings.Contains(msg, "handshake") {
		// With another private-network key the stream is garbled from the first byte.
		attrs = append(attrs, "hint", "the peer answers but the secure handshake fails: is it using the same --cluster-key-file?")
	}
	d.log.Info(msg, attrs...)
}

// dialAttempts bounds the retries of connectAsync.
const dialAttempts = 4

func toMultiaddrs(ss []string) []ma.Multiaddr {
	var out []ma.Multiaddr
	for _, s := range ss {
		a, err := ma.NewMultiaddr(s)
		if err != nil {
			continue
		}
		tpt, _ := peer.SplitAddr(a)
		if tpt != nil {
			out = append(out, tpt)
		}
	}
	return out
}

type mdnsNotifee struct{ d *Daemon }

func (n mdnsNotifee) HandlePeerFound(info peer.AddrInfo) {
	d := n.d
	if info.ID == d.host.ID() || d.ctx.Err() != nil || d.host.Network().Connectedness(info.ID) == network.Connected {
		return
	}
	d.host.Peerstore().AddAddrs(info.ID, info.Addrs, peerstore.TempAddrTTL)
	d.log.Debug("mDNS found peer", "peer", info.ID.String())
	d.connectAsync(info)
}

func short(s string) string {
	if len(s) > 12 {
		return s[:12]
	}
	return s
}

// shortID is the tail of a peer id, the part people can tell apart.
func shortID(id string) string {
	if len(id) > 8 {
		return "…" + id[len(id)-6:]
	}
	return id
}

func (d *Daemon) serveControl(path string) error {
	os.Remove(path) // stale from a crashed daemon; we hold the state-dir lock
	ln, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	os.Chmod(path, 0o600)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		writeJSON(w, d.Status())
	})
	d.control = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := d.control.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("control socket", "err", err)
		}
	}()
	return nil
}

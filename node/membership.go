package node

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	"github.com/libp2p/go-libp2p/core/protocol"
	mss "github.com/multiformats/go-multistream"
)

// goHello runs the hello exchange on connection c unless one is running.
func (d *Daemon) goHello(c network.Conn) {
	d.mu.Lock()
	if d.hellos[c] || d.ctx.Err() != nil {
		d.mu.Unlock()
		return
	}
	d.hellos[c] = true
	d.mu.Unlock()
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		defer func() {
			d.mu.Lock()
			delete(d.hellos, c)
			d.mu.Unlock()
		}()
		// The remote may not have registered its handlers yet if it has just
		// started; retry briefly.
		for attempt := 1; ; attempt++ {
			err := d.sayHello(c)
			if err == nil || c.IsClosed() || d.ctx.Err() != nil {
				return
			}
			if attempt == 3 {
				d.log.Warn("no hello from peer: not a glmtopo daemon, or one speaking another protocol version",
					"peer", c.RemotePeer().String(), "addr", c.RemoteMultiaddr().String(), "want", string(protoHello), "err", err)
				return
			}
			d.log.Debug("hello failed", "peer", c.RemotePeer().String(), "err", err)
			select {
			case <-d.ctx.Done():
				return
			case <-time.After(d.opts.HeartbeatInterval / 2):
			}
		}
	}()
}

// sayHello sends our hello on this specific connection (not any connection
// to the peer id: with a copied key, two daemons share an id) and admits the
// peer from the reply.
func (d *Daemon) sayHello(c network.Conn) error {
	ctx, cancel := context.WithTimeout(d.ctx, d.ioTimeout())
	defer cancel()
	s, err := c.NewStream(ctx)
	if err != nil {
		return err
	}
	defer s.Close()
	s.SetDeadline(time.Now().Add(d.ioTimeout()))
	if err := mss.SelectProtoOrFail(protoHello, s); err != nil {
		s.Reset()
		return fmt.Errorf("negotiate hello: %w", err)
	}
	s.SetProtocol(protoHello)
	d.mu.Lock()
	me := d.self
	d.mu.Unlock()
	if err := writeMsg(s, &me, d.ioTimeout()); err != nil {
		return err
	}
	var rep helloReply
	if err := readMsg(s, &rep, d.ioTimeout()); err != nil {
		return err
	}
	if !rep.Accepted {
		err := fmt.Errorf("refused by %s (%s) at %s: %s", rep.Hello.Name, c.RemotePeer(), c.RemoteMultiaddr(), rep.Reason)
		d.log.Error("this daemon was refused by a cluster member; exiting", "err", err)
		select {
		case d.fatal <- err:
		default:
		}
		return nil
	}
	if ok, _ := d.admit(c, rep.Hello); !ok {
		d.closeSoon(c)
	}
	return nil
}

func (d *Daemon) handleHello(s network.Stream) {
	defer s.Close()
	var h helloMsg
	if err := readMsg(s, &h, d.ioTimeout()); err != nil {
		d.log.Warn("bad hello", "peer", s.Conn().RemotePeer().String(), "err", err)
		s.Reset()
		return
	}
	ok, reason := d.admit(s.Conn(), h)
	d.mu.Lock()
	rep := helloReply{Version: wireVersion, Accepted: ok, Reason: reason, Hello: d.self}
	d.mu.Unlock()
	writeMsg(s, &rep, d.ioTimeout())
	if !ok {
		d.closeSoon(s.Conn())
	}
}

// closeSoon closes a refused connection after the refusal had time to
// reach the other side.
func (d *Daemon) closeSoon(c network.Conn) {
	time.AfterFunc(300*time.Millisecond, func() { c.Close() })
}

// admit records the peer behind connection c from its hello. It refuses a
// second daemon using the identity of a live member: same peer id, another
// process instance, while the first instance still answers on its own
// connection. A restarted daemon's old connections died with its process, so
// a restart is admitted as a new incarnation.
func (d *Daemon) admit(c network.Conn, h helloMsg) (bool, string) {
	id := c.RemotePeer()
	if h.ID != id.String() {
		return false, fmt.Sprintf("hello claims id %s on a connection authenticated as %s", h.ID, id)
	}
	for {
		oc, oldInst, oldName := d.rivalConn(c, h)
		if oc == nil {
			break
		}
		if d.answersAs(oc, oldInst) {
			reason := fmt.Sprintf("duplicate node identity %s: already used by live daemon %q at %s; "+
				"each host needs its own node key (do not copy --state-dir between hosts)",
				id, oldName, oc.RemoteMultiaddr())
			d.log.Error("refusing duplicate node identity", "peer", id.String(), "name", h.Name,
				"from", c.RemoteMultiaddr().String(), "live_daemon", oldName, "live_addr", oc.RemoteMultiaddr().String())
			d.mu.Lock()
			d.addEvent("reject", id, h.Name, "duplicate identity from "+c.RemoteMultiaddr().String())
			d.mu.Unlock()
			return false, reason
		}
		// The old instance is gone but its connection lingers: drop it.
		d.mu.Lock()
		delete(d.connInstance, oc)
		d.mu.Unlock()
		oc.Close()
	}
	return d.record(c, h)
}

// rivalConn returns an open connection of another live instance with the
// same peer id, if there is one.
func (d *Daemon) rivalConn(c network.Conn, h helloMsg) (network.Conn, string, string) {
	id := c.RemotePeer()
	d.mu.Lock()
	defer d.mu.Unlock()
	m := d.members[id]
	if m == nil || m.hello.Instance == h.Instance || m.health == HealthDead {
		return nil, "", ""
	}
	for _, oc := range d.host.Network().ConnsToPeer(id) {
		if oc != c && !oc.IsClosed() && d.connInstance[oc] == m.hello.Instance {
			return oc, m.hello.Instance, m.hello.Name
		}
	}
	return nil, "", ""
}

// answersAs reports whether the daemon on connection oc is still instance
// inst: it runs a hello exchange on that connection, bounded by the suspect
// timeout.
func (d *Daemon) answersAs(oc network.Conn, inst string) bool {
	ctx, cancel := context.WithTimeout(d.ctx, d.opts.SuspectAfter)
	defer cancel()
	s, err := oc.NewStream(ctx)
	if err != nil {
		return false
	}
	defer s.Close()
	s.SetDeadline(time.Now().Add(d.opts.SuspectAfter))
	if err := mss.SelectProtoOrFail(protoHello, s); err != nil {
		s.Reset()
		return false
	}
	s.SetProtocol(protoHello)
	d.mu.Lock()
	me := d.self
	d.mu.Unlock()
	if writeMsg(s, &me, d.opts.SuspectAfter) != nil {
		return false
	}
	var rep helloReply
	if readMsg(s, &rep, d.opts.SuspectAfter) != nil {
		return false
	}
	return rep.Hello.Instance == inst
}

// record admits the peer behind c.
func (d *Daemon) record(c network.Conn, h helloMsg) (bool, string) {
	id := c.RemotePeer()
	now := time.Now()
	d.mu.Lock()
	defer d.mu.Unlock()
	m := d.members[id]
	d.connInstance[c] = h.Instance
	d.host.Peerstore().AddAddrs(id, toMultiaddrs(h.Addrs), peerstore.RecentlyConnectedAddrTTL)
	switch {
	case m == nil:
		m = &member{id: id, joinedAt: now}
		d.members[id] = m
		d.log.Info("member joined", "peer", id.String(), "name", h.Name, "addr", c.RemoteMultiaddr().String())
		d.addEvent("join", id, h.Name, "")
		d.changedAt = now
	case m.hello.Instance != h.Instance:
		d.log.Info("member restarted", "peer", id.String(), "name", h.Name, "was", m.health)
		d.addEvent("join", id, h.Name, "restarted")
		m.joinedAt, m.activeEpoch, m.deadReason = now, 0, ""
		m.stage = memberStage{}
		d.changedAt = now
		d.breakPlanLocked(id, fmt.Sprintf("host %s (%s) restarted", h.Name, shortID(id.String())))
	case m.health == HealthDead:
		d.log.Info("member back", "peer", id.String(), "name", h.Name)
		d.addEvent("join", id, h.Name, "back")
		m.deadReason = ""
		d.changedAt = now
	}
	for oid, o := range d.members {
		if oid != id && o.hello.Name == h.Name && o.health != HealthDead && m.hello.Name != h.Name {
			d.log.Warn("two hosts share a name; give each its own --name", "name", h.Name, "peer", id.String(), "other", oid.String())
		}
	}
	if h.Model.ConfigHash != d.model.ConfigHash && (m.hello.Model != h.Model) {
		d.log.Warn("member has a different model; no plan will be made until it matches",
			"peer", id.String(), "name", h.Name, "its_model", h.Model.Ref, "its_hash", short(h.Model.ConfigHash),
			"our_model", d.model.Ref, "our_hash", short(d.model.ConfigHash))
	}
	m.hello = h
	m.lastSeen = now
	m.health = HealthAlive
	return true, ""
}

func (d *Daemon) ioTimeout() time.Duration {
	return 2*d.opts.HeartbeatInterval + time.Second
}

// sendHeartbeats sends one heartbeat to every member that is not dead.
// Heartbeats never dial: reconnecting is the redial loop's job.
func (d *Daemon) sendHeartbeats() {
	stage := d.opts.Stages.report() // outside d.mu: it reads the runtime's counters
	d.mu.Lock()
	d.seq++
	hb := heartbeatMsg{Version: wireVersion, ID: d.self.ID, Instance: d.self.Instance, Seq: d.seq,
		MaxEpoch: d.maxEpoch, Stage: stage}
	if d.active != nil {
		hb.ActiveEpoch = d.active.Epoch
	}
	var targets []peer.ID
	for id, m := range d.members {
		if m.health != HealthDead {
			hb.Members = append(hb.Members, memberDigest{ID: id.String(), Addrs: m.hello.Addrs})
			if id != d.host.ID() {
				targets = append(targets, id)
			}
		}
	}
	d.mu.Unlock()
	for _, id := range targets {
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			if err := d.send(id, protoHeartbeat, &hb); err != nil {
				d.log.Debug("heartbeat not sent", "peer", id.String(), "err", err)
			}
		}()
	}
}

// send opens a stream to id (without dialing) and writes one message.
func (d *Daemon) send(id peer.ID, proto protocol.ID, msg any) error {
	ctx, cancel := context.WithTimeout(network.WithNoDial(d.ctx, "membership"), d.ioTimeout())
	defer cancel()
	s, err := d.host.NewStream(ctx, id, proto)
	if err != nil {
		return err
	}
	defer s.Close()
	return writeMsg(s, msg, d.ioTimeout())
}

func (d *Daemon) handleHeartbeat(s network.Stream) {
	defer s.Close()
	var hb heartbeatMsg
	if err := readMsg(s, &hb, d.ioTimeout()); err != nil {
		s.Reset()
		return
	}
	c := s.Conn()
	id := c.RemotePeer()
	if hb.ID != id.String() {
		return
	}
	now := time.Now()
	d.mu.Lock()
	m := d.members[id]
	if m == nil || m.hello.Instance != hb.Instance || d.connInstance[c] != hb.Instance {
		// Not admitted on this connection yet (or an instance we refused):
		// the hello exchange decides.
		d.mu.Unlock()
		d.goHello(c)
		return
	}
	m.lastSeen = now
	m.activeEpoch, m.maxEpoch = hb.ActiveEpoch, hb.MaxEpoch
	if hb.Stage != nil {
		m.stage = memberStage{rep: hb.Stage, at: now}
	}
	switch m.health {
	case HealthSuspect:
		d.log.Info("member alive again", "peer", id.String(), "name", m.hello.Name)
		d.addEvent("alive", id, m.hello.Name, "")
	case HealthDead:
		d.log.Info("member back", "peer", id.String(), "name", m.hello.Name)
		d.addEvent("join", id, m.hello.Name, "back")
		m.deadReason = ""
		d.changedAt = now
	}
	m.health = HealthAlive
	d.maxEpoch = max(d.maxEpoch, hb.MaxEpoch)
	var unknown []peer.AddrInfo
	for _, md := range hb.Members {
		pid, err := peer.Decode(md.ID)
		if err != nil || pid == d.host.ID() {
			continue
		}
		if _, known := d.members[pid]; !known && d.host.Network().Connectedness(pid) != network.Connected {
			unknown = append(unknown, peer.AddrInfo{ID: pid, Addrs: toMultiaddrs(md.Addrs)})
		}
	}
	// Catch up with a commit we missed: the coordinator reports the epoch
	// active and we hold that proposal.
	if d.pending != nil && hb.ActiveEpoch == d.pending.Epoch && d.pending.Coordinator == hb.ID {
		d.activateLocked(d.pending)
	}
	d.mu.Unlock()
	for _, info := range unknown {
		d.connectAsync(info)
	}
}

func (d *Daemon) sendLeave() {
	d.mu.Lock()
	msg := leaveMsg{Version: wireVersion, ID: d.self.ID, Instance: d.self.Instance}
	var targets []peer.ID
	for id, m := range d.members {
		if id != d.host.ID() && m.health != HealthDead {
			targets = append(targets, id)
		}
	}
	d.mu.Unlock()
	// Wait for each acknowledgement (bounded): closing the host right after
	// writing could drop the message in the muxer's buffers.
	var wg sync.WaitGroup
	for _, id := range targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(network.WithNoDial(context.Background(), "leave"), time.Second)
			defer cancel()
			s, err := d.host.NewStream(ctx, id, protoLeave)
			if err != nil {
				return
			}
			defer s.Close()
			if writeMsg(s, &msg, time.Second) == nil {
				var ack leaveMsg
				readMsg(s, &ack, time.Second)
			}
		}()
	}
	wg.Wait()
}

func (d *Daemon) handleLeave(s network.Stream) {
	defer s.Close()
	var msg leaveMsg
	if err := readMsg(s, &msg, d.ioTimeout()); err != nil {
		s.Reset()
		return
	}
	id := s.Conn().RemotePeer()
	d.mu.Lock()
	defer d.mu.Unlock()
	ack := leaveMsg{Version: wireVersion, ID: d.self.ID, Instance: d.self.Instance}
	defer writeMsg(s, &ack, d.ioTimeout())
	m := d.members[id]
	if m == nil || msg.ID != id.String() || m.hello.Instance != msg.Instance || m.health == HealthDead {
		return
	}
	m.health, m.deadReason = HealthDead, "left (daemon shut down)"
	d.changedAt = time.Now()
	m.lostAt, m.stage = d.changedAt, memberStage{}
	d.breakPlanLocked(id, fmt.Sprintf("host %s (%s) left", m.hello.Name, shortID(id.String())))
	d.log.Info("member left", "peer", id.String(), "name", m.hello.Name)
	d.addEvent("leave", id, m.hello.Name, m.deadReason)
}

// detectFailures is the failure detector: a member not heard from for
// SuspectAfter is suspect, for DeadAfter dead.
func (d *Daemon) detectFailures(now time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for id, m := range d.members {
		if id == d.host.ID() || m.health == HealthDead {
			continue
		}
		silent := now.Sub(m.lastSeen)
		switch {
		case silent >= d.opts.DeadAfter:
			m.health = HealthDead
			m.deadReason = fmt.Sprintf("no heartbeat for %s (dead-after %s)", silent.Round(time.Millisecond), d.opts.DeadAfter)
			d.changedAt = now
			m.lostAt, m.stage = now, memberStage{}
			d.breakPlanLocked(id, fmt.Sprintf("host %s (%s) was dead: %s", m.hello.Name, shortID(id.String()), m.deadReason))
			d.log.Warn("member dead", "peer", id.String(), "name", m.hello.Name, "reason", m.deadReason)
			d.addEvent("dead", id, m.hello.Name, m.deadReason)
		case silent >= d.opts.SuspectAfter && m.health == HealthAlive:
			m.health = HealthSuspect
			d.log.Warn("member suspect", "peer", id.String(), "name", m.hello.Name, "silent", silent.Round(time.Millisecond))
			d.addEvent("suspect", id, m.hello.Name, fmt.Sprintf("silent for %s", silent.Round(time.Millisecond)))
		}
	}
}

// breakPlanLocked records that a host of the active plan failed: the plan
// stays degraded until a new epoch is active, even if the host comes back
// (its process state, e.g. loaded weights, cannot be trusted).
func (d *Daemon) breakPlanLocked(id peer.ID, reason string) {
	if d.active == nil {
		return
	}
	if _, ok := d.active.Assignment(id.String()); !ok {
		return
	}
	for _, r := range d.broken {
		if r == reason {
			return
		}
	}
	d.broken = append(d.broken, reason)
}

package node

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/libp2p/go-libp2p/core/pnet"
)

// Options configure a Daemon. Zero durations take the defaults below.
type Options struct {
	StateDir string   // node key, lock and control socket live here
	Name     string   // human name; default: the inventory hostname
	Listen   []string // multiaddrs or host:port
	Peers    []string // static peers: multiaddrs (with or without /p2p/) or host:port
	MDNS     bool     // LAN discovery by multicast DNS
	PSK      pnet.PSK // private network key (32 bytes); required
	Head     bool     // prefer this host as coordinator
	Expect   int      // plan once this many hosts are live
	StartNow bool     // plan with whoever is live, without waiting for Expect

	Model        string                                    // --model: a directory or preset name
	ResolveModel func(ref string) (hash string, err error) // default HashModelRef
	Planner      Planner                                   // default EvenSplitPlanner{92, 160}

	// Inventory, if set, replaces detection (--inventory-override).
	Inventory *HostInventory

	HeartbeatInterval time.Duration // default 1s
	SuspectAfter      time.Duration // default 3 heartbeats
	DeadAfter         time.Duration // default 6 heartbeats
	SettleAfter       time.Duration // membership must be unchanged this long before planning; default 2 heartbeats
	// ReplanAfter is how long the coordinator waits for a lost host of the
	// active plan before planning over the survivors alone (replan.go);
	// default DefaultReplanAfter, negative: never (wait for it to return).
	ReplanAfter time.Duration

	// OnAssign, if set, is called before this host acknowledges a proposed
	// assignment; an error refuses the plan (the coordinator retries later).
	OnAssign func(ctx context.Context, plan ClusterPlan, mine StageAssignment) error
	// OnActive, if set, is called when a plan becomes active on this host.
	OnActive func(plan ClusterPlan, mine StageAssignment)
	// Stages, if set, is where the runtime reports its stage's state;
	// Status.Stages shows it.
	Stages *StageStates
	// DataAddr (--data-listen) is where this host's pipeline stage accepts
	// its ring link; members learn it from the hello and plans carry it.
	DataAddr string
	// Links, if set, reports this host's data-plane links (transport
	// telemetry) for status; a Runtime with a Links method sets it.
	Links func() []LinkStatus

	Logger *slog.Logger
}

// Default timing.
const (
	DefaultHeartbeatInterval = time.Second
	DefaultListen            = "0.0.0.0:7946"
	// DefaultReplanAfter covers a daemon's crash and restart (by systemd or
	// an operator: it rejoins within seconds of starting, before loading
	// any weights) and a network blip a few times over, which then cost
	// one reload of every stage instead of two (the survivors' plan, then
	// the full one again). A host that stays away longer, like a reboot
	// (minutes) or a hardware loss, costs 30 s of downtime on top of the
	// reload, small against loading a large model's weights.
	DefaultReplanAfter = 30 * time.Second
)

func (o *Options) setDefaults() error {
	if o.StateDir == "" {
		return fmt.Errorf("state dir is required")
	}
	if len(o.PSK) != 32 {
		return fmt.Errorf("a 32-byte cluster key is required (--cluster-key-file)")
	}
	if o.Model == "" {
		return fmt.Errorf("model is required (--model DIR|PRESET)")
	}
	if o.Expect <= 0 && !o.StartNow {
		return fmt.Errorf("set --expect N (hosts in the cluster) or --start-now")
	}
	if o.ResolveModel == nil {
		o.ResolveModel = HashModelRef
	}
	if o.Planner == nil {
		o.Planner = EvenSplitPlanner{NumLayers: 92, NumExperts: 160}
	}
	if len(o.Listen) == 0 {
		o.Listen = []string{DefaultListen}
	}
	if o.HeartbeatInterval <= 0 {
		o.HeartbeatInterval = DefaultHeartbeatInterval
	}
	if o.SuspectAfter <= 0 {
		o.SuspectAfter = 3 * o.HeartbeatInterval
	}
	if o.DeadAfter <= 0 {
		o.DeadAfter = 2 * o.SuspectAfter
	}
	if o.SettleAfter <= 0 {
		o.SettleAfter = 2 * o.HeartbeatInterval
	}
	if o.ReplanAfter == 0 {
		o.ReplanAfter = DefaultReplanAfter
	}
	if o.SuspectAfter <= o.HeartbeatInterval {
		return fmt.Errorf("suspect-after (%s) must exceed heartbeat-interval (%s)", o.SuspectAfter, o.HeartbeatInterval)
	}
	if o.DeadAfter < o.SuspectAfter {
		return fmt.Errorf("dead-after (%s) must not be less than suspect-after (%s)", o.DeadAfter, o.SuspectAfter)
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return nil
}

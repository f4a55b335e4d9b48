// Package node is the glmtopo daemon: one per host. It runs a libp2p host
// with a persistent identity and a private-network key, discovers peers by
// mDNS and static addresses, reports the local hardware inventory, keeps a
// membership table with a heartbeat failure detector, elects a coordinator
// deterministically, and distributes a cluster plan that becomes active only
// after every member has acknowledged it.
//
// A listen port in use is an error at start (SO_REUSEPORT is off), the
// cluster key file must be private to its owner (like an ssh key), and
// peers that cannot be reached or fail the secure handshake (another
// cluster key) are reported at info level, once a minute per peer.
//
// Entry points for the CLI: RunNode (glmtopo node), RunInventory
// (glmtopo node inventory), RunStatus (glmtopo status) and RunClusterKey
// (glmtopo node cluster-key).
//
// The plan's stages run through a Runtime (RunNodeRuntime; cmd/glmtopo
// wires the engine): each member advertises its data-plane address
// (--data-listen) in its hello, plans carry it to the stages' neighbours,
// and each daemon runs its stage of the active plan, stopping the previous
// epoch's first.
//
// Losing a host: the coordinator waits --replan-after (default 30 s, see
// DefaultReplanAfter for why) for a lost host of the active plan to
// return, then plans over the survivors alone if the planner finds a plan
// for them (its memory check: they can hold the model); until then, or if
// they cannot, the cluster stays degraded and the head answers 503 with
// Retry-After. --replan-after 0 never plans without the lost host. A lost
// host that returns, before or after the survivors' plan, is planned in
// again once the membership has settled (--settle-after): --expect is the
// cluster's intended size and the survivors' plan a stopgap; its return
// costs one more reload of every stage. The policy is decide (replan.go),
// tested event by event.
//
// Stage counters: each daemon's runtime gives its stage's steps, tokens,
// compute time per step (p50/p99), idle time and link traffic
// (StageStates.SetMetrics); heartbeats carry them to every member, so that
// every daemon's `glmtopo status` (its "stages" entries, and the text's
// stages table) covers every stage, and the head's /metrics exports them
// (StageCollector, glmtopo:stage_*).
//
// The planner and the model resolver are supplied through Options (Planner,
// ResolveModel) so this package depends on neither topology nor model;
// EvenSplitPlanner and HashModelRef are the fallbacks used until those are
// wired.
package node

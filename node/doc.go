// Package node is the glmtopo daemon: one per host. It runs a libp2p host
// with a persistent identity and a private-network key, discovers peers by
// mDNS and static addresses, reports the local hardware inventory, keeps a
// membership table with a heartbeat failure detector, elects a coordinator
// deterministically, and distributes a cluster plan that becomes active only
// after every member has acknowledged it.
//
// Entry points for the CLI: RunNode (glmtopo node), RunInventory
// (glmtopo node inventory), RunStatus (glmtopo status) and RunClusterKey
// (glmtopo node cluster-key).
//
// The planner and the model resolver are supplied through Options (Planner,
// ResolveModel) so this package depends on neither topology nor model;
// EvenSplitPlanner and HashModelRef are the fallbacks used until those are
// wired.
package node

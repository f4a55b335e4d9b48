package model

import (
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"
)

// RankComm is what one rank's Forward needs besides its weights' slices
// (Shard) when a stage's layers run on several ranks (parallel/tp).
type RankComm struct {
	// TP sums o_proj's and the dense MLP's partial outputs over the ranks
	// holding the layer's other heads and intermediate slices; nil when the
	// rank holds them whole (TP 1).
	TP kernels.Collective
	// MoE sums an MoE layer's partial outputs over every rank: its routed
	// experts (whole, or slices of them) and its shared-expert slice, in
	// one all-reduce. nil on a single rank.
	MoE kernels.Collective
	// SharedExpert says whether this rank adds its shared-expert slice:
	// where attention is replicated (TP < ranks) one replica of each
	// slice adds it, so that the MoE sum counts it once.
	SharedExpert bool
	// Replicas, when set, says which replica of an expert held by several
	// ranks (EPLB) serves each token.
	Replicas ReplicaMask
	// AllToAll, when set, dispatches the MoE layers by all-to-all-v over
	// MoE (which must be a kernels.Exchanger; dispatch.go) instead of the
	// one all-reduce of partials: each rank routes its slice of the tokens
	// and sends each route to the ranks AllToAll names. SharedExpert and
	// Replicas are then unused. nil: the all-reduce.
	AllToAll ExpertServers
}

// ExpertServers says which ranks (members of RankComm.MoE) compute what
// under all-to-all dispatch.
type ExpertServers interface {
	// Routed is the ranks [first, first+n) computing token's route to
	// routed expert e of layer: the EP group of the replica serving it
	// (token mod replicas, as ReplicaMask), each rank holding a slice of
	// the expert (n = 1 with whole experts).
	Routed(layer, token, expert int) (first, n int)
	// Shared is the ranks [first, first+n) whose shared-expert slices sum
	// to the whole shared expert for this rank's tokens: its TP group.
	Shared() (first, n int)
}

// ReplicaMask chooses, for experts replicated over ranks, the one rank that
// serves each (token, expert) route, so that the MoE sum counts it once.
type ReplicaMask interface {
	// Replicated reports whether the rank holds experts of layer that other
	// ranks also hold (only then are its routing weights masked).
	Replicated(layer int) bool
	// Serves reports whether the rank serves token's route to expert.
	Serves(layer, token, expert int) bool
}

func (r *RankComm) tp() kernels.Collective {
	if r == nil {
		return nil
	}
	return r.TP
}

func (r *RankComm) moe() kernels.Collective {
	if r == nil {
		return nil
	}
	return r.MoE
}

// allReduce sums x's partial values over c's ranks in place (nothing
// without a collective). The sum runs even after an error elsewhere would
// not: a rank that fails stops, and the collective fails its peers.
func (f *Forward) allReduce(c kernels.Collective, x *kernels.Tensor, what string) {
	if c == nil || f.err != nil {
		return
	}
	f.do(what+" all-reduce", c.AllReduceSum(x))
}

// DeviceReplicaMask is an optional extension of ReplicaMask: the rank's
// replica table of a layer where the rank's backend keeps it (uploaded once,
// kernels.ReplicaMasker's [E, 2] layout), so that the mask runs on the
// device with no host round trip and decode graphs can capture it.
type DeviceReplicaMask interface {
	ReplicaMask
	// Table is layer's table on the rank's backend; nil when the layer
	// needs no mask or has no device table (the host path masks then).
	Table(layer int) *kernels.Tensor
}

// maskReplicas zeroes the routing weights of the routes this rank holds an
// expert for but does not serve: another replica of that expert does. With
// a device table and a backend that is a kernels.ReplicaMasker it is one
// kernel; otherwise it masks on the host (the CPU reference's path, and any
// backend without the op): a synchronisation and three copies per MoE layer
// and step, which a CUDA graph cannot capture.
func (f *Forward) maskReplicas(layer int, ids, wts *kernels.Tensor) error {
	if f.Ranks == nil || f.Ranks.Replicas == nil {
		return nil
	}
	if dm, ok := f.Ranks.Replicas.(DeviceReplicaMask); ok {
		if rm, ok := f.BE.(kernels.ReplicaMasker); ok {
			if tab := dm.Table(layer); tab != nil {
				return rm.MaskReplicas(wts, ids, tab)
			}
		}
	}
	if !f.Ranks.Replicas.Replicated(layer) {
		return nil
	}
	iv, err := f.BE.DownloadI32(ids)
	if err != nil {
		return err
	}
	wv, err := f.BE.Download(wts)
	if err != nil {
		return err
	}
	if len(wv) != len(iv) {
		return fmt.Errorf("%d routing weights for %d expert ids", len(wv), len(iv))
	}
	k := ids.Cols()
	for i, e := range iv {
		if !f.Ranks.Replicas.Serves(layer, i/k, int(e)) {
			wv[i] = 0
		}
	}
	return f.BE.Upload(wts, f32Bytes(wv))
}

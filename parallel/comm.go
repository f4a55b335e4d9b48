package parallel

import (
	"errors"
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
)

// oneRankComm is the RankComm of an engine that holds its layers whole and
// still runs them through a communicator (EngineOptions.Collective): a
// tensor-parallel stage of size 1, as vLLM runs one GPU. Its all-reduces are
// sums over one rank, which an NCCL TensorAllReducer skips (nothing enters
// a captured decode graph), so the engine's results do not change; the path
// is what the acceptance of the multi-GPU stage times against the plain one.
func oneRankComm(c kernels.Collective, ranks RankGroup) (*model.RankComm, error) {
	if c == nil {
		return nil, nil
	}
	if ranks != nil {
		return nil, errors.New("EngineOptions.Collective with a rank group: the group's ranks hold their own communicators")
	}
	if n := c.Size(); n != 1 || c.Rank() != 0 {
		return nil, fmt.Errorf("EngineOptions.Collective is rank %d of %d: an engine holding whole layers sums over one rank (several ranks: EngineOptions.Ranks)", c.Rank(), n)
	}
	// One rank holds every head, every intermediate slice and every
	// expert: it adds the shared expert itself and masks no replica.
	return &model.RankComm{TP: c, MoE: c, SharedExpert: true}, nil
}

// newForward is a step's forward over the engine's own layers on be: every
// model.Forward the engine runs its layers with comes from here, so the
// one-rank communicator, if any, reaches eager steps, captured decode
// graphs and the MTP layer alike.
func (e *Engine) newForward(be kernels.Backend, meta kernels.BatchMeta, tokens int) *model.Forward {
	return &model.Forward{Cfg: e.Cfg, BE: be, Meta: meta, T: tokens, Ranks: e.comm}
}

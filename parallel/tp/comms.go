package tp

import (
	"context"
	"errors"
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
)

// RankComms are one rank's communicators: TP over its attention replica's
// ranks (member i is the rank of TPRank i), MoE over every rank of the
// grid (member i is rank i). Either may be nil where the grid needs none
// (TP 1; one rank).
type RankComms struct {
	TP, MoE kernels.Collective
}

// Comms are the communicators a Collectives factory made for a group.
type Comms struct {
	// Ranks are rank r's communicators, by rank.
	Ranks []RankComms
	// Abort makes every pending and later call of every rank's
	// communicators fail (NCCL: ncclCommAbort): the group calls it when a
	// rank fails, the step's context ends or the step overruns its
	// timeout, so that no rank stays blocked on a peer that stopped.
	// Safe from any goroutine and more than once; nil when there is
	// nothing to abort.
	Abort func()
	// Close frees the communicators; the group calls it once, after its
	// ranks stopped and before their backends close. May be nil.
	Close func()
}

// Collectives makes the communicators of g's ranks; bes[r] is rank r's
// backend. It runs once, in New, after every rank's weights are loaded;
// ctx (New's) bounds it. On error it must leave nothing behind.
//
// Communicators made once serve every step (unlike the default in-process
// ones, made per step): a step that fails after Abort leaves them aborted,
// and the group refuses later steps (NCCL cannot re-join a communicator
// after ncclCommAbort; the stage is reopened instead).
type Collectives func(ctx context.Context, g *Grid, bes []kernels.Backend) (*Comms, error)

// errAborted is why a group whose communicators were aborted takes no step.
var errAborted = errors.New("rank group: the communicators were aborted by an earlier failed step; reopen the group")

// openComms runs the factory and checks what it made against the grid.
func openComms(ctx context.Context, g *Grid, ranks []*rank, f Collectives) (*Comms, error) {
	bes := make([]kernels.Backend, len(ranks))
	for i, rk := range ranks {
		bes[i] = rk.be
	}
	c, err := f(ctx, g, bes)
	if err != nil {
		return nil, fmt.Errorf("rank group %s: communicators: %w", g, err)
	}
	if err := checkComms(g, c); err != nil {
		c.close()
		return nil, fmt.Errorf("rank group %s: communicators: %w", g, err)
	}
	return c, nil
}

// checkComms refuses communicators whose sizes or ranks do not match the
// grid: a wrong one would sum the wrong partials, or hang in NCCL.
func checkComms(g *Grid, c *Comms) error {
	if c == nil || len(c.Ranks) != g.Ranks {
		n := 0
		if c != nil {
			n = len(c.Ranks)
		}
		return fmt.Errorf("made for %d ranks, the grid has %d", n, g.Ranks)
	}
	for r, rc := range c.Ranks {
		if g.TP > 1 {
			if err := checkComm(rc.TP, "TP", g.TP, g.TPRank(r)); err != nil {
				return fmt.Errorf("rank %d: %w", r, err)
			}
		}
		if g.Ranks > 1 {
			if err := checkComm(rc.MoE, "MoE", g.Ranks, r); err != nil {
				return fmt.Errorf("rank %d: %w", r, err)
			}
		}
	}
	return nil
}

func checkComm(c kernels.Collective, what string, size, rank int) error {
	if c == nil {
		return fmt.Errorf("no %s communicator (want rank %d of %d)", what, rank, size)
	}
	if c.Size() != size || c.Rank() != rank {
		return fmt.Errorf("%s communicator is rank %d of %d, want rank %d of %d", what, c.Rank(), c.Size(), rank, size)
	}
	return nil
}

func (c *Comms) abort() {
	if c != nil && c.Abort != nil {
		c.Abort()
	}
}

func (c *Comms) close() {
	if c != nil && c.Close != nil {
		c.Close()
	}
}

// rankComm is rank r's RankComm over the factory's communicators.
func (c *Comms) rankComm(g *Grid, r int) *model.RankComm {
	return g.comm(r, c.Ranks[r].TP, c.Ranks[r].MoE)
}

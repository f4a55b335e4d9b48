package main

import (
	"context"
	"errors"
	"io"

	"github.com/glmtopo/glmtopo/topology"
)

// runPlan: an infeasible plan has already printed why; exit 1 without repeating it.
func runPlan(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	err := topology.RunPlan(ctx, args, stdout, stderr)
	if errors.Is(err, topology.ErrInfeasible) {
		return errSilentFailure
	}
	return err
}

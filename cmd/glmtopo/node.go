package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"

	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/node"
	"github.com/glmtopo/glmtopo/parallel"
)

// runNode wires the daemon to the topology planner and the model registry.
func runNode(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	planner := node.TopologyPlanner{Resolve: model.Resolve, Logger: slog.Default()}
	// --speculative-config (node's flag set is the node package's): the
	// plan places the MTP layer on the head and sizes verify steps for N
	// drafts; without it the planner's default (one draft) stands.
	args, spec, err := parallel.SplitSpecArgs(args)
	if err != nil {
		return fmt.Errorf("glmtopo node: %w", err)
	}
	if spec.Enabled() {
		planner.Request.SpeculativeTokens = spec.NumSpeculativeTokens
	}
	configHash := func(ref string) (string, error) {
		cfg, err := model.Resolve(ref)
		if err != nil {
			return "", err
		}
		return cfg.Hash(), nil
	}
	return node.RunNodeRuntime(ctx, args, stdout, stderr, planner, configHash, &nodeRuntime{}) // noderun.go
}

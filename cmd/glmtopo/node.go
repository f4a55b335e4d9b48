package main

import (
	"context"
	"io"
	"log/slog"

	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/node"
)

// runNode wires the daemon to the topology planner and the model registry.
func runNode(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	planner := node.TopologyPlanner{Resolve: model.Resolve, Logger: slog.Default()}
	configHash := func(ref string) (string, error) {
		cfg, err := model.Resolve(ref)
		if err != nil {
			return "", err
		}
		return cfg.Hash(), nil
	}
	return node.RunNodeWith(ctx, args, stdout, stderr, planner, configHash)
}

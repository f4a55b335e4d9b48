// Command benchstep runs `glmtopo bench step` standalone (for GPU hosts,
// before the subcommand is wired into cmd/glmtopo).
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"

	"github.com/glmtopo/glmtopo/bench/step"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := step.Run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "bench step:", err)
		os.Exit(1)
	}
}

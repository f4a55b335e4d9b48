// Command testcmd runs the node package's entry points without cmd/glmtopo,
// for trying the daemon by hand: testcmd node|inventory|status|cluster-key [flags].
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/glmtopo/glmtopo/node"
)

func main() {
	cmds := map[string]func(context.Context, []string, io.Writer, io.Writer) error{
		"node":        node.RunNode,
		"inventory":   node.RunInventory,
		"status":      node.RunStatus,
		"cluster-key": node.RunClusterKey,
	}
	if len(os.Args) < 2 || cmds[os.Args[1]] == nil {
		fmt.Fprintln(os.Stderr, "usage: testcmd node|inventory|status|cluster-key [flags]")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := cmds[os.Args[1]](ctx, os.Args[2:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "testcmd:", err)
		os.Exit(1)
	}
}

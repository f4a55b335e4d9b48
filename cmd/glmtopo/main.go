// Command glmtopo serves GLM-4.5-class MoE models across several multi-GPU hosts.
// This file only dispatches subcommands; each package owns its logic.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/glmtopo/glmtopo/bench"
	collectivebench "github.com/glmtopo/glmtopo/bench/collective"
	"github.com/glmtopo/glmtopo/bench/step"
	"github.com/glmtopo/glmtopo/node"

	"github.com/glmtopo/glmtopo/internal/cliflag"
)

// command is one subcommand: args exclude the command's own name.
type command struct {
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

func commands() map[string]command {
	return map[string]command{
		"generate":         {"generate tokens from a checkpoint (CPU or CUDA engine)", runGenerate},
		"model inspect":    {"print a model's architecture, parameters and bytes by dtype", runModelInspect},
		"model synth":      {"write a random-weight checkpoint in the published layout", runModelSynth},
		"node":             {"run the cluster daemon on this host", runNode},
		"node inventory":   {"print this host's hardware as the daemon detects it", node.RunInventory},
		"node cluster-key": {"create a cluster key file (the private-network key hosts share)", node.RunClusterKey},
		"status":           {"show a daemon's cluster: members, health, plan epoch", node.RunStatus},
		"serve":            {"serve the OpenAI-compatible API (chat, completions, tools, reasoning)", runServe},
		"stage":            {"run decoder layers of a pipeline whose head is serve --pipeline-head-layers", runStage},
		"bench serve":      {"benchmark an OpenAI-compatible server like vllm bench serve", bench.RunServe},
		"bench step":       {"time prefill and decode steps on a GPU against the HBM and GEMM roofline", step.Run},
		"bench transport":  {"latency and bandwidth of the stage-to-stage links (TCP, NCCL) against raw TCP", runBenchTransport},
		"bench collective": {"NCCL all-reduce, all-gather, reduce-scatter and all-to-all-v at decode and prefill sizes (nccl-tests busbw)", collectivebench.Run},
		"plan":             {"fit, placement and predicted throughput of a model on a set of hosts", runPlan},
		"version":          {"print the version", runVersion},
	}
}

const version = "glmtopo 0.1.0-dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: logLevel()})))
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

func logLevel() slog.Level {
	var l slog.Level
	if err := l.UnmarshalText([]byte(os.Getenv("GLMTOPO_LOG"))); err != nil {
		return slog.LevelInfo
	}
	return l
}

// run finds the longest command name matching the leading args and runs it.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cmds := commands()
	for n := min(2, len(args)); n >= 1; n-- {
		name := strings.Join(args[:n], " ")
		if c, ok := cmds[name]; ok {
			return exitCode(stderr, name, c.run(ctx, args[n:], stdout, stderr))
		}
	}
	switch {
	case len(args) == 0: // a command is required: usage on stderr, like go and git
		usage(stderr, cmds, "")
		return 2
	case isHelp(args[0]):
		usage(stdout, cmds, "")
		return 0
	case hasGroup(cmds, args[0]) && (len(args) == 1 || isHelp(args[1])):
		// "glmtopo bench -h" lists the group's commands; "glmtopo bench" alone is a usage error.
		if len(args) == 1 {
			fmt.Fprintf(stderr, "glmtopo %s: a subcommand is required\n\n", args[0])
			usage(stderr, cmds, args[0])
			return 2
		}
		usage(stdout, cmds, args[0])
		return 0
	}
	fmt.Fprintf(stderr, "glmtopo: unknown command %q\n\n", strings.Join(args, " "))
	usage(stderr, cmds, "")
	return 2
}

// exitCode reports a command's error once and maps it to an exit status.
func exitCode(stderr io.Writer, name string, err error) int {
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		return 2
	case errors.Is(err, errSilentFailure):
		return 1
	}
	// Packages prefix their errors with their own name ("plan: ..."); say it once.
	msg := err.Error()
	for _, p := range []string{"glmtopo " + name + ": ", name + ": "} {
		msg = strings.TrimPrefix(msg, p)
	}
	fmt.Fprintf(stderr, "glmtopo %s: %s\n", name, msg)
	return 1
}

func isHelp(a string) bool { return a == "help" || a == "-h" || a == "--help" || a == "-help" }

// hasGroup reports whether some command is "group sub".
func hasGroup(cmds map[string]command, group string) bool {
	for n := range cmds {
		if strings.HasPrefix(n, group+" ") {
			return true
		}
	}
	return false
}

func runVersion(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("version", stderr)
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		fmt.Fprintln(stderr, "usage: glmtopo version")
		return errUsage
	}
	fmt.Fprintln(stdout, version)
	return nil
}

var (
	errUsage         = errors.New("usage")
	errSilentFailure = errors.New("failed (reported above)")
)

// usage lists the commands, or with group set only that group's.
func usage(w io.Writer, cmds map[string]command, group string) {
	if group == "" {
		fmt.Fprintln(w, "usage: glmtopo <command> [flags]\n\ncommands:")
	} else {
		fmt.Fprintf(w, "usage: glmtopo %s <command> [flags]\n\ncommands:\n", group)
	}
	var names []string
	for n := range cmds {
		if group == "" || n == group || strings.HasPrefix(n, group+" ") {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-16s %s\n", n, cmds[n].summary)
	}
	fmt.Fprintln(w, "\nRun 'glmtopo <command> -h' for a command's flags.")
}

// newFlags makes a FlagSet that reports errors instead of exiting.
func newFlags(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("glmtopo "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

// parse parses flags and maps flag errors to errUsage (the message is already printed).
func parse(fs *flag.FlagSet, args []string) error {
	if err := cliflag.Parse(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	return nil
}

// progress prints a byte-progress line to w at most every half second.
func progress(w io.Writer, what string) func(done, total int64) {
	var last time.Time
	return func(done, total int64) {
		if total <= 0 {
			return
		}
		pct := int(100 * done / total)
		if time.Since(last) > 500*time.Millisecond || done == total {
			last = time.Now()
			fmt.Fprintf(w, "\r%s %3d%% (%.2f / %.2f GB)", what, pct, float64(done)/1e9, float64(total)/1e9)
			if done == total {
				fmt.Fprintln(w)
			}
		}
	}
}

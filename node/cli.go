package node

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/glmtopo/glmtopo/internal/cliflag"
)

// stringList is a repeatable, comma-separated flag.
type stringList []string

func (s *stringList) String() string { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error {
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			*s = append(*s, p)
		}
	}
	return nil
}

func defaultStateDir() string {
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "glmtopo")
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".local", "state", "glmtopo")
	}
	return ".glmtopo"
}

// NodeFlags binds the `glmtopo node` flags to opts; the returned function
// finishes the options after parsing (key file, inventory file, logger).
func NodeFlags(fs *flag.FlagSet, opts *Options, stderr io.Writer) func() error {
	opts.MDNS = true
	fs.StringVar(&opts.StateDir, "state-dir", defaultStateDir(), "directory for the node key, lock and control socket (one per daemon)")
	fs.StringVar(&opts.Name, "name", "", "host name shown to the cluster (default: hostname)")
	listen := stringList{}
	fs.Var(&listen, "listen", "listen address, multiaddr or host:port; repeatable (default "+DefaultListen+")")
	fs.Var((*stringList)(&opts.Peers), "peers", "static peers: multiaddrs or host:port, comma-separated or repeated")
	fs.BoolVar(&opts.MDNS, "mdns", true, "discover peers on the LAN by mDNS (does not cross subnets)")
	keyFile := fs.String("cluster-key-file", "", "`FILE` holding the private network key all hosts share (create it with 'glmtopo node cluster-key --out FILE')")
	fs.BoolVar(&opts.Head, "head", false, "prefer this host as coordinator")
	fs.IntVar(&opts.Expect, "expect", 0, "plan once this many hosts are live")
	fs.BoolVar(&opts.StartNow, "start-now", false, "plan with the hosts that are live now, without waiting for --expect")
	fs.StringVar(&opts.Model, "model", "", "model directory or preset name (must be the same model on every host)")
	fs.StringVar(&opts.DataAddr, "data-listen", "", "host:port where this host's pipeline stage accepts its ring link (the stages' data plane)")
	invFile := fs.String("inventory-override", "", "YAML/JSON inventory that replaces hardware detection")
	fs.DurationVar(&opts.HeartbeatInterval, "heartbeat-interval", DefaultHeartbeatInterval, "interval between heartbeats")
	fs.DurationVar(&opts.SuspectAfter, "suspect-after", 0, "silence after which a member is suspect (default 3 heartbeats)")
	fs.DurationVar(&opts.DeadAfter, "dead-after", 0, "silence after which a member is dead (default 2x suspect-after)")
	fs.DurationVar(&opts.SettleAfter, "settle-after", 0, "membership must be stable this long before (re)planning (default 2 heartbeats)")
	fs.DurationVar(&opts.ReplanAfter, "replan-after", DefaultReplanAfter, "wait this long for a lost host before planning over the survivors alone, if they can hold the model (0: never, wait for it)")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	return func() error {
		opts.Listen = listen
		switch {
		case opts.ReplanAfter < 0:
			return fmt.Errorf("--replan-after %s: must not be negative (0: never replan without a lost host)", opts.ReplanAfter)
		case opts.ReplanAfter == 0:
			opts.ReplanAfter = -1 // Options' "never"
		}
		if *keyFile == "" {
			return errors.New("--cluster-key-file is required: create one with `glmtopo node cluster-key --out FILE` and copy it to every host")
		}
		psk, err := LoadClusterKey(*keyFile)
		if err != nil {
			return err
		}
		opts.PSK = psk
		if *invFile != "" {
			inv, err := LoadInventory(*invFile)
			if err != nil {
				return err
			}
			opts.Inventory = &inv
		}
		var lvl slog.Level
		if err := lvl.UnmarshalText([]byte(*logLevel)); err != nil {
			return fmt.Errorf("--log-level: %w", err)
		}
		opts.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: lvl}))
		return nil
	}
}

// RunNode is `glmtopo node [flags]`: it runs the daemon until ctx ends. It
// returns an error if the daemon cannot start or a cluster member refuses it.
// It uses the fallbacks EvenSplitPlanner and HashModelRef; see RunNodeWith.
func RunNode(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return RunNodeWith(ctx, args, stdout, stderr, nil, nil)
}

// RunNodeWith is RunNode with the real planner and model resolver wired in;
// nil selects the fallback.
func RunNodeWith(ctx context.Context, args []string, stdout, stderr io.Writer, planner Planner, resolve func(string) (string, error)) error {
	return RunNodeRuntime(ctx, args, stdout, stderr, planner, resolve, nil)
}

// Runtime runs the stages of the plans that become active on this host;
// cmd/glmtopo wires the engine in through it (node does not import the
// engine).
type Runtime interface {
	// AddFlags registers the runtime's flags (serving, backend) on glmtopo node's.
	AddFlags(fs *flag.FlagSet)
	// Activate is called, in epoch order and never concurrently, when a
	// plan becomes active on this host.
	Activate(plan ClusterPlan, mine StageAssignment, opts *Options)
	// Close stops what Activate started.
	Close()
}

// RunNodeRuntime is RunNodeWith whose daemon runs its stages of the active
// plan through rt (nil: it only agrees on plans).
func RunNodeRuntime(ctx context.Context, args []string, stdout, stderr io.Writer, planner Planner, resolve func(string) (string, error), rt Runtime) error {
	fs := flag.NewFlagSet("glmtopo node", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var opts Options
	finish := NodeFlags(fs, &opts, stderr)
	if rt != nil {
		rt.AddFlags(fs)
		defer rt.Close()
		opts.Stages = &StageStates{}
		opts.OnActive = func(plan ClusterPlan, mine StageAssignment) { rt.Activate(plan, mine, &opts) }
		if lr, ok := rt.(interface{ Links() []LinkStatus }); ok {
			opts.Links = lr.Links
		}
	}
	if err := cliflag.Parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("glmtopo node: unexpected arguments %q", fs.Args())
	}
	if err := finish(); err != nil {
		return err
	}
	opts.Planner, opts.ResolveModel = planner, resolve
	d, err := Start(ctx, opts)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "glmtopo node %s up\n  id: %s\n  addrs: %s\n  status: glmtopo status --state-dir %s\n",
		d.self.Name, d.ID(), strings.Join(d.Addrs(), " "), opts.StateDir)
	return d.Wait(ctx)
}

// RunInventory is `glmtopo node inventory [--json] [--inventory-override FILE]`.
func RunInventory(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("glmtopo node inventory", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	override := fs.String("inventory-override", "", "print this inventory file instead of detecting")
	nvml := fs.String("nvml-lib", "", "path to libnvidia-ml.so (default: search the loader path)")
	if err := cliflag.Parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var inv HostInventory
	var err error
	if *override != "" {
		inv, err = LoadInventory(*override)
	} else {
		inv, err = InventorySource{NVMLPath: *nvml}.Detect(ctx)
	}
	if err != nil {
		return err
	}
	if *asJSON {
		return writeJSON(stdout, inv)
	}
	return WriteInventoryTable(stdout, inv)
}

// RunStatus is `glmtopo status --state-dir DIR [--json]`.
func RunStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("glmtopo status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	stateDir := fs.String("state-dir", defaultStateDir(), "state dir of the daemon to ask")
	asJSON := fs.Bool("json", false, "print JSON")
	timeout := fs.Duration("timeout", 5*time.Second, "give up after this long")
	if err := cliflag.Parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	st, err := QueryStatus(ctx, *stateDir)
	if err != nil {
		return err
	}
	if *asJSON {
		return writeJSON(stdout, st)
	}
	return WriteStatusText(stdout, st)
}

// RunClusterKey is `glmtopo node cluster-key [--out FILE]`: it creates a new
// private network key. It never overwrites an existing file.
func RunClusterKey(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("glmtopo node cluster-key", flag.ContinueOnError)
	fs.SetOutput(stderr)
	out := fs.String("out", "", "write the key to this file (mode 0600) instead of stdout")
	if err := cliflag.Parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	key, err := NewClusterKey()
	if err != nil {
		return err
	}
	if *out == "" {
		_, err := stdout.Write(key)
		return err
	}
	f, err := os.OpenFile(*out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("cluster key: %w", err)
	}
	if _, err := f.Write(key); err != nil {
		f.Close()
		return fmt.Errorf("cluster key: %w", err)
	}
	return f.Close()
}

package collectivebench

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/glmtopo/glmtopo/internal/cliflag"
	"github.com/glmtopo/glmtopo/transport/nccl"
)

// Options are the command's flags.
type Options struct {
	Ranks   int
	Devices []int // rank i's GPU; nil: one per GPU when there are enough, else shared
	Batches []int // rows of the hidden state; > DecodeMaxBatch is a prefill chunk
	Hidden  int
	DType   nccl.DType
	Ops     []string
	Iters   int // timed calls per size; 0: by size (50 … 1000)
	Warmup  int
	Timeout time.Duration
	// Command is how this binary is re-executed for a rank: the arguments
	// before the flags (the CLI's "bench collective").
	Command []string
	Logger  *slog.Logger
}

// DecodeMaxBatch is the widest batch reported as a decode step.
const DecodeMaxBatch = 64

// ErrNoGPU means there is no GPU (or no libnccl) to measure on.
var ErrNoGPU = errors.New("needs a CUDA GPU and libnccl.so.2")

var errUsage = errors.New("usage")

// Run is `glmtopo bench collective [--json] [--ranks N] [flags]`. A rank
// process (re-executed by Run itself, with childEnv set) measures and
// prints its own report instead.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, asJSON, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	if spec := os.Getenv(childEnv); spec != "" {
		return runChild(ctx, o, spec, stdout)
	}
	rep, err := runRanks(ctx, o, args, stderr)
	if err != nil {
		return err
	}
	if asJSON {
		return writeJSON(stdout, rep)
	}
	return writeTable(stdout, rep)
}

func parseFlags(args []string, stderr io.Writer) (Options, bool, error) {
	fs := flag.NewFlagSet("glmtopo bench collective", flag.ContinueOnError)
	fs.SetOutput(stderr)
	ranks := fs.Int("ranks", 2, "ranks (processes): one per GPU when there are as many GPUs, otherwise sharing GPUs (run the CUDA MPS daemon)")
	devices := fs.String("devices", "", "rank i's GPU, comma-separated (default: rank i on GPU i, or all on the GPUs there are)")
	batches := fs.String("batches", "1,2,4,8,16,32,64,2048", fmt.Sprintf("rows of the hidden state per call (≤ %d: decode; larger: a prefill chunk)", DecodeMaxBatch))
	hidden := fs.Int("hidden", 5120, "hidden size (GLM-4.5: 5120)")
	dtype := fs.String("dtype", "bf16", "element type: bf16 or f32")
	ops := fs.String("ops", strings.Join(AllOps, ","), "collectives to measure")
	iters := fs.Int("iters", 0, "timed calls per size (0: from 1000 at 10 KiB down to 50 at 20 MiB)")
	warmup := fs.Int("warmup", 10, "untimed calls per size first")
	timeout := fs.Duration("timeout", 5*time.Minute, "give up (and abort the communicators) after this long")
	asJSON := fs.Bool("json", false, `print {"ranks":…,"results":[{"op":…,"size_bytes":…,"p50_us":…,"busbw_gbps":…},…]}`)
	if err := cliflag.Parse(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return Options{}, false, err
		}
		return Options{}, false, errUsage
	}
	if fs.NArg() > 0 {
		return Options{}, false, fmt.Errorf("bench collective: unexpected arguments %q", fs.Args())
	}
	o := Options{Ranks: *ranks, Hidden: *hidden, Iters: *iters, Warmup: *warmup, Timeout: *timeout,
		Command: []string{"bench", "collective"}, Logger: slog.Default()}
	var err error
	if o.Ops, err = parseOps(*ops); err != nil {
		return o, false, err
	}
	if o.Batches, err = parseInts("--batches", *batches, 1); err != nil {
		return o, false, err
	}
	if *devices != "" {
		if o.Devices, err = parseInts("--devices", *devices, 0); err != nil {
			return o, false, err
		}
	}
	switch *dtype {
	case "bf16":
		o.DType = nccl.BFloat16
	case "f32":
		o.DType = nccl.Float32
	default:
		return o, false, fmt.Errorf("--dtype %q: want bf16 or f32", *dtype)
	}
	return o, *asJSON, o.check()
}

func (o *Options) check() error {
	switch {
	case o.Ranks < 1:
		return fmt.Errorf("--ranks %d: want at least 1", o.Ranks)
	case o.Devices != nil && len(o.Devices) != o.Ranks:
		return fmt.Errorf("--devices names %d GPUs for %d ranks", len(o.Devices), o.Ranks)
	case o.Hidden < 1:
		return fmt.Errorf("--hidden %d: want at least 1", o.Hidden)
	case o.Iters < 0 || o.Warmup < 0:
		return fmt.Errorf("--iters %d, --warmup %d: want ≥ 0", o.Iters, o.Warmup)
	}
	for _, b := range o.Batches {
		if int64(b)*int64(o.Hidden) < int64(o.Ranks) {
			return fmt.Errorf("batch %d × hidden %d is fewer elements than %d ranks", b, o.Hidden, o.Ranks)
		}
		if int64(b)*int64(o.Hidden)*o.DType.Size() > 1<<34 {
			return fmt.Errorf("batch %d × hidden %d: over 16 GiB per buffer", b, o.Hidden)
		}
	}
	return nil
}

// parseInts parses a comma-separated list of integers ≥ least.
func parseInts(flagName, s string, least int) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < least {
			return nil, fmt.Errorf("%s: %q is not an integer ≥ %d", flagName, f, least)
		}
		out = append(out, n)
	}
	return out, nil
}

// itersFor is how many calls of size bytes are timed: enough for a p99
// at decode sizes, a bounded time at prefill sizes.
func itersFor(o Options, size int64) int {
	if o.Iters > 0 {
		return o.Iters
	}
	return int(min(1000, max(50, (256<<20)/max(size, 1))))
}

func phase(batch int) string {
	if batch <= DecodeMaxBatch {
		return "decode"
	}
	return "prefill"
}

// Package transportbench is `glmtopo bench transport`: ping-pong latency and
// streaming bandwidth of the transport links over message sizes, with raw
// TCP between the same endpoints measured in the same run as the reference,
// and NCCL (plus the TCP link with page-locked staging of device memory)
// where a GPU and libnccl are present.
//
// Latencies are one-way: half the round trip of a ping-pong. Bandwidths are
// GB/s (1e9 bytes per second) of payload streamed to the peer.
package transportbench

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/glmtopo/glmtopo/internal/cliflag"
	"github.com/glmtopo/glmtopo/transport"
	"github.com/glmtopo/glmtopo/transport/nccl"
	"github.com/glmtopo/glmtopo/transport/tcp"
)

// Result is one size on one link, as --json prints it.
type Result struct {
	SizeBytes int64   `json:"size_bytes"`
	Link      string  `json:"link"`
	GBps      float64 `json:"gbps"`
	RawGBps   float64 `json:"raw_gbps"`
	P50us     float64 `json:"p50_us"`
	P99us     float64 `json:"p99_us"`
	RawP50us  float64 `json:"raw_p50_us"`
}

// Report is the --json document.
type Report struct {
	Results []Result `json:"results"`
}

// Options are the command's flags.
type Options struct {
	Listen, Peer string
	Sizes        []int64
	StreamBytes  int64
	MaxMessages  int
	Rounds       int // interleaved raw/link repetitions; each result keeps its best
	Key          []byte
	FrameMAC     bool
	NCCL         string // auto, on, off
	Device       int
	NIC          nccl.NICChoice // which NIC NCCL uses (NCCL_IB_HCA, NCCL_SOCKET_IFNAME)
	Timeout      time.Duration
	Logger       *slog.Logger
}

// Hooks are what the command takes from other packages (the CLI wires the
// node's): the cluster key reader and the host's RDMA ports.
type Hooks struct {
	LoadKey func(path string) ([]byte, error)    // node.LoadClusterKey
	NICs    func(ctx context.Context) []nccl.NIC // the inventory's RDMA ports; nil: none
}

var errUsage = errors.New("usage")

// Run is `glmtopo bench transport [flags]`.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer, hooks Hooks) error {
	fs := flag.NewFlagSet("glmtopo bench transport", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "", "serve as the far endpoint on HOST:PORT (the raw TCP reference uses PORT+1)")
	peer := fs.String("peer", "", "measure against a --listen endpoint at HOST:PORT")
	sizes := fs.String("sizes", "4K,16K,64K,256K,1M,4M,16M,64M", "message sizes (K, M suffixes: KiB, MiB)")
	streamBytes := fs.String("stream-bytes", "512M", "bytes streamed per size for the bandwidth")
	maxMsgs := fs.Int("max-messages", 20000, "at most this many messages streamed per size")
	rounds := fs.Int("rounds", 3, "interleaved raw/link repetitions per size (the best of each is reported)")
	keyFile := fs.String("cluster-key-file", "", "cluster key (required with --listen/--peer; loopback uses a fresh one)")
	frameMAC := fs.Bool("frame-mac", false, "authenticate every frame (HMAC-SHA256), not only the handshake")
	ncclMode := fs.String("nccl", "auto", "measure NCCL and pinned-staging links: auto (where a GPU and libnccl exist), on, off")
	device := fs.Int("device", 0, "CUDA device for the NCCL and pinned links")
	ibHCA := fs.String("nccl-ib-hca", "", "NCCL_IB_HCA for the NCCL link (default: the fastest active RDMA port of the inventory; the user's NCCL_* environment wins)")
	ifname := fs.String("nccl-socket-ifname", "", "NCCL_SOCKET_IFNAME (default: that port's netdev)")
	timeout := fs.Duration("timeout", 10*time.Minute, "give up after this long")
	asJSON := fs.Bool("json", false, `print {"results":[…]} (one object per size and link)`)
	if err := cliflag.Parse(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("bench transport: unexpected arguments %q", fs.Args())
	}
	o := Options{Listen: *listen, Peer: *peer, MaxMessages: *maxMsgs, Rounds: *rounds, FrameMAC: *frameMAC, NCCL: *ncclMode, Device: *device, Timeout: *timeout, Logger: slog.Default()}
	var err error
	if o.Sizes, err = parseSizes(*sizes); err != nil {
		return err
	}
	sb, err := parseSizes(*streamBytes)
	if err != nil || len(sb) != 1 {
		return fmt.Errorf("--stream-bytes %q: %v", *streamBytes, err)
	}
	o.StreamBytes = sb[0]
	o.NIC = nccl.NICChoice{HCA: *ibHCA, Ifname: *ifname}
	if hooks.NICs != nil && o.NCCL != "off" {
		o.NIC.NICs = hooks.NICs(ctx)
	}
	if *keyFile != "" {
		if o.Key, err = hooks.LoadKey(*keyFile); err != nil {
			return err
		}
	} else if o.Listen != "" || o.Peer != "" {
		return errors.New("--cluster-key-file is required between two hosts (the link is authenticated)")
	}
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	var rep *Report
	switch {
	case o.Listen != "" && o.Peer != "":
		return errors.New("give --listen or --peer, not both")
	case o.Listen != "":
		return Serve(ctx, o)
	case o.Peer != "":
		rep, err = Client(ctx, o)
	default:
		rep, err = Loopback(ctx, o)
	}
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	return writeTable(stdout, rep)
}

func parseSizes(s string) ([]int64, error) {
	var out []int64
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		mult := int64(1)
		switch {
		case strings.HasSuffix(f, "K"):
			mult, f = 1<<10, strings.TrimSuffix(f, "K")
		case strings.HasSuffix(f, "M"):
			mult, f = 1<<20, strings.TrimSuffix(f, "M")
		case strings.HasSuffix(f, "G"):
			mult, f = 1<<30, strings.TrimSuffix(f, "G")
		}
		n, err := strconv.ParseInt(f, 10, 64)
		if err != nil || n < 0 {
			return nil, fmt.Errorf("size %q: want a number with an optional K/M/G suffix", f)
		}
		out = append(out, n*mult)
	}
	return out, nil
}

func writeTable(w io.Writer, rep *Report) error {
	fmt.Fprintf(w, "%-10s %-11s %9s %9s %6s %9s %9s %9s %6s\n", "size", "link", "GB/s", "raw GB/s", "%raw", "p50 µs", "p99 µs", "raw p50", "×raw")
	for _, r := range rep.Results {
		pct, ratio := 0.0, 0.0
		if r.RawGBps > 0 {
			pct = 100 * r.GBps / r.RawGBps
		}
		if r.RawP50us > 0 {
			ratio = r.P50us / r.RawP50us
		}
		fmt.Fprintf(w, "%-10s %-11s %9.3f %9.3f %5.0f%% %9.1f %9.1f %9.1f %6.2f\n", human(r.SizeBytes), r.Link, r.GBps, r.RawGBps, pct, r.P50us, r.P99us, r.RawP50us, ratio)
	}
	return nil
}

func human(n int64) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d B", n)
}

// rawAddr is the raw reference's address: the link's port + 1.
func rawAddr(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", err
	}
	p, err := strconv.Atoi(port)
	if err != nil {
		return "", err
	}
	return net.JoinHostPort(host, strconv.Itoa(p+1)), nil
}

func linkConfig(o Options, name string) tcp.Config {
	return tcp.Config{Name: name, Key: o.Key, FrameMAC: o.FrameMAC, Logger: o.Logger, Limits: transport.DefaultLimits()}
}

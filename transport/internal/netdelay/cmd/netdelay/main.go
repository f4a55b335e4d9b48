// Command netdelay is scripts/netns.sh's delay line for kernels without
// sch_netem: run inside a network namespace whose outgoing packets an
// iptables rule sends to NFQUEUE queue -queue, it lets each through -delay
// (± -jitter) later, in order. SIGTERM or SIGINT lets the waiting packets go
// and exits; so does the deletion of the namespace named by -netns, so that
// a delay line never outlives its emulated host.
//
//	ip netns exec glmtopo-ns0 netdelay -queue 0 -delay 1ms -netns glmtopo-ns0 -ready /run/x.ready &
//	ip netns exec glmtopo-ns0 iptables-legacy -A OUTPUT -o glmtopo-h0 -j NFQUEUE --queue-num 0 --queue-bypass
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/glmtopo/glmtopo/transport/internal/netdelay"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "netdelay:", err)
		os.Exit(1)
	}
}

func run() error {
	queue := flag.Uint("queue", 0, "NFQUEUE queue number (0…65535)")
	delay := flag.Duration("delay", time.Millisecond, "delay added to every packet")
	jitter := flag.Duration("jitter", 0, "uniform jitter, ± this; packet order is kept")
	maxLen := flag.Uint("maxlen", 1024, "packets queued at most; beyond it the kernel drops (and counts) them, like netem's limit")
	failOpen := flag.Bool("fail-open", false, "when the queue is full, let packets through undelayed instead of dropping them")
	netns := flag.String("netns", "", "exit once /run/netns/NAME is no longer this process's network namespace")
	ready := flag.String("ready", "", "create this file once the queue is bound")
	flag.Parse()
	if flag.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", flag.Args())
	}
	if *queue > 65535 || *maxLen == 0 || *maxLen > 1<<20 {
		return fmt.Errorf("-queue %d or -maxlen %d out of range", *queue, *maxLen)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if *netns != "" {
		var cancel context.CancelFunc
		ctx, cancel = context.WithCancel(ctx)
		defer cancel()
		go watchNetns(ctx, cancel, *netns, log)
	}
	cfg := netdelay.Config{
		Queue: uint16(*queue), Delay: *delay, Jitter: *jitter, Rand: rand.Float64,
		MaxLen: uint32(*maxLen), FailOpen: *failOpen, Logger: log,
		Ready: func() {
			log.Info("netdelay: bound", "queue", *queue, "delay", *delay, "jitter", *jitter, "maxlen", *maxLen, "fail_open", *failOpen)
			if *ready != "" {
				if err := os.WriteFile(*ready, []byte(fmt.Sprintln(os.Getpid())), 0o644); err != nil {
					log.Error("netdelay: ready file", "err", err)
				}
			}
		},
	}
	st, err := netdelay.Run(ctx, cfg)
	log.Info("netdelay: done", "queue", *queue, "packets", st.Packets, "accepted", st.Accepted, "batches", st.Batches,
		"max_waiting", st.MaxLen, "max_late", st.MaxLate, "kernel_dropped", st.KernelDropped,
		"user_dropped", st.UserDropped, "overruns", st.Overruns, "verdict_errors", st.Errors)
	return err
}

// watchNetns cancels once /run/netns/name stops naming this process's
// network namespace (ip netns del unmounts it): nothing else would end a
// delay line whose namespace was deleted under it.
func watchNetns(ctx context.Context, cancel context.CancelFunc, name string, log *slog.Logger) {
	self, err := nsID("/proc/self/ns/net")
	if err != nil {
		log.Warn("netdelay: cannot watch the namespace", "err", err)
		return
	}
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if id, err := nsID("/run/netns/" + name); err != nil || id != self {
			log.Info("netdelay: namespace gone, exiting", "netns", name)
			cancel()
			return
		}
	}
}

type devIno struct{ dev, ino uint64 }

func nsID(path string) (devIno, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return devIno{}, fmt.Errorf("stat %s: %w", path, err)
	}
	if st.Ino == 0 {
		return devIno{}, errors.New("stat " + path + ": no inode")
	}
	return devIno{uint64(st.Dev), st.Ino}, nil
}

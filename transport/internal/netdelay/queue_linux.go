//go:build linux

package netdelay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

const (
	ackTimeout  = 2 * time.Second // a config request's ack
	idleWait    = time.Second     // longest wait with nothing queued
	drainBudget = 256             // datagrams read before releasing again
	rcvBuf      = 16 << 20        // room for a full queue's messages
)

// Run binds cfg.Queue and delays its packets until ctx is done; then it
// lets every waiting packet through and unbinds. It blocks an OS thread in
// ppoll(2), whose timeout has nanosecond resolution: an idle Go process
// sleeps in epoll_wait, whose timeout is whole milliseconds, so its timers
// may be up to 1 ms late, as much as the delay itself.
func Run(ctx context.Context, cfg Config) (st Stats, err error) {
	if cfg.MaxLen == 0 {
		return Stats{}, errors.New("netdelay: MaxLen 0")
	}
	line, err := NewLine(cfg.Delay, cfg.Jitter, int(cfg.MaxLen), cfg.Rand)
	if err != nil {
		return Stats{}, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	// One thread waits in ppoll for the whole run; its timer slack (50 µs
	// by default) would be added to every release.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	_ = unix.Prctl(unix.PR_SET_TIMERSLACK, 1, 0, 0, 0)
	q, err := openQueue(cfg.Queue)
	if err != nil {
		return Stats{}, err
	}
	defer q.close()
	stop := context.AfterFunc(ctx, q.wakeUp)
	defer stop()
	r := &runner{q: q, line: line, log: log}
	if err := r.request(ctx, BindMsg(q.nextSeq(), cfg.Queue)); err != nil {
		return r.st, fmt.Errorf("bind queue %d: %w", cfg.Queue, err)
	}
	defer func() {
		r.shutdown(cfg.Queue)
		st = r.st
	}()
	flags := uint32(FlagGSO)
	if cfg.FailOpen {
		flags |= FlagFailOpen
	}
	if err := r.request(ctx, ParamsMsg(q.nextSeq(), cfg.Queue, cfg.MaxLen, flags)); err != nil {
		return r.st, fmt.Errorf("configure queue %d: %w", cfg.Queue, err)
	}
	if cfg.Ready != nil {
		cfg.Ready()
	}
	return r.st, r.loop(ctx) // st is set again once shutdown has counted
}

// runner is Run's state: the socket, the schedule, the counters.
type runner struct {
	q    *queue
	line *Line
	log  *slog.Logger
	st   Stats
	evs  []Event
}

func (r *runner) loop(ctx context.Context) error {
	for {
		now := time.Now()
		r.release(now)
		if ctx.Err() != nil {
			return nil
		}
		until, ok := r.line.Next()
		if !ok {
			until = now.Add(idleWait)
		}
		readable, err := r.q.wait(until)
		if err != nil {
			return err
		}
		if readable {
			if err := r.drain(); err != nil {
				return err
			}
		}
	}
}

// release accepts every packet due at now with one batch verdict.
func (r *runner) release(now time.Time) {
	due, ok := r.line.Next()
	if !ok || due.After(now) {
		return
	}
	r.st.MaxLate = max(r.st.MaxLate, now.Sub(due))
	last, n := r.line.Release(now)
	r.verdict(last, n)
}

func (r *runner) verdict(last uint32, n int) {
	if n == 0 {
		return
	}
	if err := r.q.send(BatchVerdictMsg(0, r.q.num, last, VerdictAccept)); err != nil {
		// The packets stay queued; the next batch (ids only grow) covers them.
		r.st.Errors++
		r.log.Warn("netdelay: batch verdict", "queue", r.q.num, "id", last, "err", err)
		return
	}
	r.st.Batches++
	r.st.Accepted += uint64(n)
}

// drain reads what the socket holds (at most drainBudget datagrams, so
// that due packets are not kept waiting behind a flood).
func (r *runner) drain() error {
	for range drainBudget {
		b, err := r.q.recv()
		switch {
		case errors.Is(err, unix.EAGAIN):
			return nil
		case errors.Is(err, unix.ENOBUFS):
			r.st.Overruns++
			continue
		case err != nil:
			return fmt.Errorf("netdelay: receive on queue %d: %w", r.q.num, err)
		}
		if err := r.handle(b, time.Now(), 0); err != nil {
			return err
		}
	}
	return nil
}

// handle decodes one datagram: packets go on the line; an ack or error for
// request seq want is returned as a *ackErr (nil errno: success).
func (r *runner) handle(b []byte, arrived time.Time, want uint32) error {
	var err error
	r.evs, err = Parse(r.evs[:0], b)
	if err != nil {
		r.log.Warn("netdelay: malformed message", "queue", r.q.num, "err", err)
	}
	var ack error
	for _, ev := range r.evs {
		switch {
		case ev.Packet != nil:
			r.push(ev.Packet.ID, arrived)
		case ev.IsAck && want != 0 && ev.Seq == want:
			ack = &ackErr{errno: ev.Errno}
		case ev.IsAck && ev.Errno != 0:
			r.st.Errors++
			r.log.Debug("netdelay: verdict error", "queue", r.q.num, "err", ev.Errno)
		}
	}
	return ack
}

func (r *runner) push(id uint32, arrived time.Time) {
	r.st.Packets++
	if _, err := r.line.Push(id, arrived); err != nil {
		// Cannot happen while the kernel bounds the queue to the line's
		// capacity; if it does, the packet is let through rather than held.
		r.log.Warn("netdelay: line full, packet not delayed", "queue", r.q.num, "id", id)
		if err := r.q.send(VerdictMsg(0, r.q.num, id, VerdictAccept)); err != nil {
			r.st.Errors++
		}
		return
	}
	r.st.MaxLen = max(r.st.MaxLen, r.line.Len())
}

type ackErr struct{ errno unix.Errno }

func (e *ackErr) Error() string { return fmt.Sprintf("netlink ack: %v", e.errno) }

// request sends a config message and waits (ackTimeout at most) for its
// acknowledgement, queueing any packet that arrives meanwhile.
func (r *runner) request(ctx context.Context, msg []byte) error {
	seq := nativeSeq(msg)
	if err := r.q.send(msg); err != nil {
		return err
	}
	deadline := time.Now().Add(ackTimeout)
	for time.Now().Before(deadline) {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		readable, err := r.q.wait(deadline)
		if err != nil {
			return err
		}
		if !readable {
			continue
		}
		b, err := r.q.recv()
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.ENOBUFS) {
			continue
		} else if err != nil {
			return err
		}
		var ack *ackErr
		if err := r.handle(b, time.Now(), seq); errors.As(err, &ack) {
			if ack.errno != 0 {
				return ack.errno
			}
			return nil
		}
	}
	return fmt.Errorf("no netlink ack within %v", ackTimeout)
}

// shutdown lets every waiting packet through, reads the kernel's drop
// counters, and unbinds (the kernel drops what is still queued then: with
// the iptables rule already gone, nothing is).
func (r *runner) shutdown(num uint16) {
	last, n := r.line.Flush()
	r.verdict(last, n)
	r.q.clearWake()
	r.st.KernelDropped, r.st.UserDropped, _ = kernelCounters(num)
	if err := r.request(context.Background(), UnbindMsg(r.q.nextSeq(), num)); err != nil {
		r.log.Warn("netdelay: unbind", "queue", num, "err", err)
	}
}

// kernelCounters reads queue num's queue_dropped and user_dropped from
// /proc/net/netfilter/nfnetlink_queue (of the calling thread's namespace).
func kernelCounters(num uint16) (queueDropped, userDropped uint64, err error) {
	data, err := os.ReadFile("/proc/thread-self/net/netfilter/nfnetlink_queue")
	if err != nil {
		return 0, 0, err
	}
	for _, l := range strings.Split(string(data), "\n") {
		// queue_number peer_portid queue_total copy_mode copy_range queue_dropped user_dropped id_sequence 1
		f := strings.Fields(l)
		if len(f) < 7 || f[0] != strconv.Itoa(int(num)) {
			continue
		}
		qd, err1 := strconv.ParseUint(f[5], 10, 64)
		ud, err2 := strconv.ParseUint(f[6], 10, 64)
		return qd, ud, errors.Join(err1, err2)
	}
	return 0, 0, fmt.Errorf("queue %d not in nfnetlink_queue", num)
}

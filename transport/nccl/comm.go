package nccl

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/glmtopo/glmtopo/kernels/cuda"
)

// device is what a communicator needs of a GPU: *cuda.Device, or a fake in
// the CPU tests.
type device interface {
	Do(fn func() error) error
	StreamDone(s uintptr) (bool, error)
}

var _ device = (*cuda.Device)(nil)

// Comm is a communicator of nranks ranks on one device.
type Comm struct {
	l            *lib // every NCCL call goes through it: the process's, or a HostLibrary's
	c            uintptr
	dev          device
	rank, nranks int
	aborted      atomic.Bool
	abortWait    time.Duration
	// enqueue serialises groups: a communicator is not thread-safe, and a
	// non-blocking one takes no new call until the last one has left
	// ncclInProgress (two Links, one per direction, share a Comm).
	enqueue sync.Mutex
}

// abortWait bounds how long a deadline path waits for ncclCommAbort before
// returning anyway (it keeps running on its goroutine): abort joins NCCL's
// init thread, which a foreign library could in principle leave stuck.
const abortWait = 10 * time.Second

// InitRank joins communicator id as rank of nranks on dev. It returns when
// every rank has joined, or, when ctx ends first, aborts the half-made
// communicator and returns ctx's error: a missing peer never blocks the
// caller past its deadline (see the package doc for NCCL < 2.14).
func InitRank(ctx context.Context, dev *cuda.Device, id UniqueID, nranks, rank int) (*Comm, error) {
	return InitRankWith(ctx, dev, id, nranks, rank, InitOptions{})
}

// InitOptions choose how a communicator is made.
type InitOptions struct {
	// Blocking makes a blocking communicator: each group (a send/recv, a
	// collective) is enqueued on the calling thread, where a non-blocking
	// one starts an NCCL thread per group (57 µs a launch on the H200: two
	// per layer of a tensor-parallel step). Its init cannot be abandoned
	// cleanly: a deadline returns to the caller, but NCCL's init waits on
	// for the missing rank. Use it where every rank is this process's (a
	// host's GPUs), not across hosts where a peer may never come.
	Blocking bool
	// Host, for tests and development only, makes the rank's init run as if
	// on a host of that name: non-empty, the init's goroutine locks its OS
	// thread for good, moves it into a UTS namespace of its own with that
	// hostname (CAP_SYS_ADMIN needed) and calls NCCL there, through Library,
	// which must be a HostLibrary opened for the same name. NCCL refuses
	// two ranks of one host on one GPU ("Duplicate GPU detected"); ranks
	// with different names count as different hosts and talk over
	// NET/Socket, so two ranks of one process can share one GPU. The name
	// alone is not enough: NCCL computes its host identity once per loaded
	// library, hence the private copy (see HostLibrary). The thread is
	// retired when the goroutine ends, never reused by Go. NCCL_HOSTID in
	// the environment would override the name: InitRankWith refuses it.
	// See emulateHost.
	Host string
	// Library is the private libnccl of Host's ranks (OpenHostLibrary(Host)),
	// shared by every communicator of those ranks; set exactly when Host is.
	// The communicator makes every NCCL call through it.
	Library *HostLibrary
}

// library is the libnccl a communicator with these options uses: the
// process's (l) or Host's private one.
func (o InitOptions) library(l *lib) (*lib, error) {
	switch {
	case o.Host == "" && o.Library == nil:
		return l, nil
	case o.Library == nil:
		return nil, fmt.Errorf("nccl emulated host %q: InitOptions.Library is nil; pass OpenHostLibrary(%q) (NCCL computes its host identity once per loaded library)", o.Host, o.Host)
	case o.Library.host != o.Host:
		return nil, fmt.Errorf("nccl emulated host %q: InitOptions.Library was opened for host %q", o.Host, o.Library.host)
	}
	if err := checkHost(o.Host); err != nil {
		return nil, err
	}
	return o.Library.l, nil
}

// InitRankWith is InitRank with options.
func InitRankWith(ctx context.Context, dev *cuda.Device, id UniqueID, nranks, rank int, opt InitOptions) (*Comm, error) {
	l, err := loadLib()
	if err != nil {
		return nil, err
	}
	return initRank(ctx, l, dev, id, nranks, rank, abortWait, opt)
}

// initResult is what the init call returned on its goroutine.
type initResult struct {
	res int32
	err error
}

func initRank(ctx context.Context, l *lib, dev device, id UniqueID, nranks, rank int, wait time.Duration, opt InitOptions) (*Comm, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("rank %d of %d: %w", rank, nranks, err)
	}
	l, err := opt.library(l)
	if err != nil {
		return nil, fmt.Errorf("rank %d of %d: %w", rank, nranks, err)
	}
	c := &Comm{l: l, dev: dev, rank: rank, nranks: nranks, abortWait: wait}
	what := "ncclCommInitRankConfig"
	cfg := newConfig()
	if opt.Blocking {
		cfg.blocking = 1
	}
	args := initRankArgs(&c.c, nranks, rank, id, uintptr(unsafe.Pointer(cfg)))
	fn := l.commInitRankConfig
	if fn == 0 { // NCCL < 2.14: blocking only
		what, fn = "ncclCommInitRank", l.commInitRank
		args = initRankArgs(&c.c, nranks, rank, id, 0)
	}
	// The call runs on its own goroutine: a blocking init (NCCL < 2.14, or
	// NCCL_COMM_BLOCKING=1 in the environment) cannot be interrupted, so
	// the caller stops waiting for it at the deadline instead.
	done := make(chan initResult, 1)
	go func() {
		var r initResult
		if opt.Host != "" {
			// No unlock: the goroutine ends on a thread in a namespace of
			// its own, which Go then retires. dev.Do's own lock nests in
			// this one (LockOSThread counts), so the init stays here.
			runtime.LockOSThread()
			if r.err = emulateHost(opt.Host); r.err != nil {
				done <- r
				return
			}
		}
		r.err = dev.Do(func() error { r.res = call(fn, args...); return nil })
		runtime.KeepAlive(cfg) // NCCL reads it during the call (and copies it)
		done <- r
	}()
	var r initResult
	select {
	case r = <-done:
	case <-ctx.Done():
		go c.reapBlockedInit(done)
		return nil, fmt.Errorf("rank %d of %d: %s still blocked at the deadline (a blocking communicator: NCCL < 2.14 or NCCL_COMM_BLOCKING=1); left to return on its own, then aborted: %w",
			rank, nranks, what, ctx.Err())
	}
	if r.err != nil {
		return nil, fmt.Errorf("rank %d of %d: %s: %w", rank, nranks, what, r.err)
	}
	if r.res != ncclSuccess && r.res != ncclInProgress {
		if c.c != 0 {
			c.abortBounded()
		}
		return nil, l.check(r.res, fmt.Sprintf("%s (rank %d of %d)", what, rank, nranks), c.c)
	}
	if err := c.waitReady(ctx, what); err != nil {
		return nil, fmt.Errorf("rank %d of %d: %w", rank, nranks, err)
	}
	return c, nil
}

// reapBlockedInit waits for an init the caller gave up on and aborts the
// communicator it may still have made.
func (c *Comm) reapBlockedInit(done <-chan initResult) {
	r := <-done
	if r.err == nil && c.c != 0 && (r.res == ncclSuccess || r.res == ncclInProgress) {
		c.Abort()
	}
}

// config is NCCL 2.14's whole ncclConfig_t (size, magic, version, blocking,
// cgaClusterSize, minCTAs, maxCTAs, netName), as NCCL_CONFIG_INITIALIZER
// fills it but for blocking = 0. NCCL copies the fields its version field
// names whatever size says, so a shorter struct (the first build here had
// only the first four) hands NCCL whatever memory follows as minCTAs,
// maxCTAs and a netName pointer: an "internal error" from init on the H200.
// pad keeps any later release's over-read on zeros (unset fields).
type config struct {
	size     uint64
	magic    uint32
	version  uint32
	blocking int32
	cga      int32
	minCTAs  int32
	maxCTAs  int32
	netName  uintptr // NCCL_CONFIG_UNDEF_PTR (NULL): NCCL picks the network
	pad      [32]uint64
}

func newConfig() *config {
	const undefInt = -2147483648 // NCCL_CONFIG_UNDEF_INT (INT_MIN)
	c := &config{magic: 0xcafebeef, version: 21400, blocking: 0, cga: undefInt, minCTAs: undefInt, maxCTAs: undefInt}
	c.size = uint64(unsafe.Offsetof(c.pad))
	return c
}

// initRankArgs lays out ncclCommInitRankConfig(ncclComm_t*, int nranks,
// ncclUniqueId id, int rank, ncclConfig_t*) (and, with cfg 0, the four
// arguments of ncclCommInitRank) for SyscallN: the 128-byte id is passed by
// value, which the SysV x86-64 ABI puts in memory (16 eightbytes on the
// stack, after the six register slots) while rank and cfg take the next
// free integer registers. TestInitRankABI checks this against C functions.
func initRankArgs(comm *uintptr, nranks, rank int, id UniqueID, cfg uintptr) []uintptr {
	args := make([]uintptr, 6, 6+16)
	args[0] = uintptr(unsafe.Pointer(comm))
	args[1] = uintptr(nranks)
	args[2] = uintptr(rank)
	args[3] = cfg
	for i := range 16 {
		args = append(args, uintptr(binary.LittleEndian.Uint64(id[8*i:])))
	}
	return args
}

// asyncError returns the communicator's state: nil when ready, errBusy while
// a non-blocking call is still in progress, or its error.
func (c *Comm) asyncError() error {
	var r int32
	res := call(c.l.getAsyncError, c.c, uintptr(unsafe.Pointer(&r)))
	if res != ncclSuccess {
		return c.l.check(res, "ncclCommGetAsyncError", c.c)
	}
	if r == ncclInProgress {
		return errBusy
	}
	return c.l.check(r, "communicator", c.c)
}

var errBusy = errors.New("in progress")

// waitReady polls until the last non-blocking call has finished; on ctx's
// end or an error it aborts the communicator.
func (c *Comm) waitReady(ctx context.Context, what string) error {
	var p poller
	for {
		err := c.asyncError()
		if err == nil {
			return nil
		}
		if !errors.Is(err, errBusy) {
			c.abortBounded()
			return fmt.Errorf("%s: %w", what, err)
		}
		if ctx.Err() != nil {
			if aerr := c.abortBounded(); aerr != nil {
				return fmt.Errorf("%s: gave up at the deadline (%v): %w", what, aerr, ctx.Err())
			}
			return fmt.Errorf("%s: gave up and aborted the communicator: %w", what, ctx.Err())
		}
		p.pause()
	}
}

// Op is one point-to-point transfer of a group.
type Op struct {
	Send  bool
	Buf   uintptr // device memory
	Bytes int64
	Peer  int
}

// Enqueue queues ops as one NCCL group on stream and returns without waiting
// for the transfer (so a CUDA graph capture can record it). Counts are
// bytes (ncclUint8).
func (c *Comm) Enqueue(ctx context.Context, stream uintptr, ops ...Op) error {
	for i, op := range ops {
		if op.Peer < 0 || op.Peer >= c.nranks || op.Bytes < 0 || op.Buf == 0 && op.Bytes > 0 {
			return fmt.Errorf("nccl send/recv: op %d: %d bytes at %#x with peer %d of %d ranks", i, op.Bytes, op.Buf, op.Peer, c.nranks)
		}
	}
	return c.group(ctx, func() (int32, string) {
		var res int32
		var what string
		for _, op := range ops {
			if r, name := c.p2p(op.Send, op.Buf, op.Bytes, Uint8, op.Peer, stream); r != ncclSuccess && r != ncclInProgress {
				res, what = r, name
			}
		}
		return res, what
	})
}

// p2p issues one ncclSend or ncclRecv of count elements of d.
func (c *Comm) p2p(send bool, buf uintptr, count int64, d DType, peer int, stream uintptr) (int32, string) {
	fn, name := c.l.recv, "ncclRecv"
	if send {
		fn, name = c.l.send, "ncclSend"
	}
	return call(fn, buf, uintptr(count), uintptr(d), uintptr(peer), c.c, stream), name
}

// group runs issue (NCCL calls on stream) between ncclGroupStart and
// ncclGroupEnd on the device's thread; issue returns the first failing
// call's result and name (ncclSuccess when none failed). A non-blocking
// communicator launches each group on a helper thread of NCCL's (one
// pthread_create per group) and answers ncclInProgress; that launch is
// waited for under ctx, and a failure or ctx's end aborts the communicator.
func (c *Comm) group(ctx context.Context, issue func() (int32, string)) error {
	c.enqueue.Lock()
	defer c.enqueue.Unlock()
	if c.aborted.Load() {
		return errors.New("nccl: communicator was aborted")
	}
	var res int32
	var what string
	err := c.dev.Do(func() error {
		if r := call(c.l.groupStart); r != ncclSuccess {
			res, what = r, "ncclGroupStart"
			return nil
		}
		res, what = issue()
		if r := call(c.l.groupEnd); res == ncclSuccess && r != ncclSuccess {
			res, what = r, "ncclGroupEnd"
		}
		return nil
	})
	if err != nil {
		return err
	}
	if res == ncclInProgress {
		return c.waitReady(ctx, what)
	}
	if res != ncclSuccess {
		c.abortBounded()
		return c.l.check(res, what, c.c)
	}
	return nil
}

// Wait polls until stream's work is done, watching the communicator's async
// error; when ctx ends first it aborts the communicator (the kernels waiting
// for a dead peer are torn down) and returns the context's error.
func (c *Comm) Wait(ctx context.Context, stream uintptr) error {
	var p poller
	for {
		done, err := c.dev.StreamDone(stream)
		if err != nil {
			c.abortBounded()
			return err
		}
		if done {
			return nil
		}
		// The async error and the context are cheap next to a round trip
		// but not free (a purego call, a lock): look every few polls.
		if p.n%checkEvery == 0 {
			if err := c.asyncError(); err != nil && !errors.Is(err, errBusy) {
				c.abortBounded()
				return err
			}
			if ctx.Err() != nil {
				c.abortBounded()
				return fmt.Errorf("nccl transfer did not finish, communicator aborted: %w", ctx.Err())
			}
		}
		p.pause()
	}
}

// Abort tears the communicator down without waiting for peers. It is safe
// to call from any goroutine and more than once.
func (c *Comm) Abort() error {
	if c.c == 0 || !c.aborted.CompareAndSwap(false, true) {
		return nil
	}
	var res int32
	c.dev.Do(func() error { res = call(c.l.commAbort, c.c); return nil })
	return c.l.check(res, "ncclCommAbort", 0)
}

// abortBounded aborts, waiting at most c.abortWait for NCCL.
func (c *Comm) abortBounded() error {
	done := make(chan error, 1)
	go func() { done <- c.Abort() }()
	t := time.NewTimer(c.abortWait)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case <-t.C:
		return fmt.Errorf("nccl: ncclCommAbort still running after %v (left to finish)", c.abortWait)
	}
}

// Close frees the communicator. It uses ncclCommAbort, which frees as
// ncclCommDestroy does but never waits for the peers (a stage shutting
// down must not hang on one that is already gone).
func (c *Comm) Close() error {
	if c.aborted.Load() || c.c == 0 {
		return nil
	}
	return c.abortBounded()
}

// Rank and Size of this communicator.
func (c *Comm) Rank() int { return c.rank }
func (c *Comm) Size() int { return c.nranks }

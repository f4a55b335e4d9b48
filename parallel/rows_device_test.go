package parallel

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/transport"
)

// The device-rows branch on the CPU: fakeRowDevice gives CPU tensors
// "device addresses" (their memory's), fakeDevLink moves device payloads
// over an in-process pipe as NCCL would (host payloads refused, every
// receive checked against its device buffer), and fakeHops forms a hop as
// nccl.ExchangeID + InitRank do: the sending end sends an id, the
// receiving end answers once it has joined, so hops formed in the wrong
// order wait on each other until their deadline.

type fakeRowDevice struct {
	be     kernels.Backend
	mu     sync.Mutex
	mem    map[uintptr][]byte
	copies atomic.Int64
}

func newFakeRowDevice(be kernels.Backend) *fakeRowDevice {
	return &fakeRowDevice{be: be, mem: map[uintptr][]byte{}}
}

func (d *fakeRowDevice) View(base *kernels.Tensor, off int64, dt kernels.DType, shape ...int) (*kernels.Tensor, error) {
	return d.be.(kernels.Viewer).View(base, off, dt, shape...)
}

func (d *fakeRowDevice) DevicePointer(t *kernels.Tensor) (uintptr, error) {
	v, ok := t.Impl.([]float32)
	if !ok || len(v) == 0 {
		return 0, fmt.Errorf("fake device: tensor held as %T", t.Impl)
	}
	b := unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(v))), 4*len(v))
	p := uintptr(unsafe.Pointer(&b[0]))
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(b) > len(d.mem[p]) {
		d.mem[p] = b
	}
	return p, nil
}

// bytes is the memory at p, n bytes of it.
func (d *fakeRowDevice) bytes(p uintptr, n int64) ([]byte, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	b, ok := d.mem[p]
	if !ok || int64(len(b)) < n {
		return nil, fmt.Errorf("fake device: %d bytes at %#x (%d known there)", n, p, len(b))
	}
	return b[:n], nil
}

func (d *fakeRowDevice) CopyDevice(dst, src uintptr, n int64) error {
	s, err := d.bytes(src, n)
	if err != nil {
		return err
	}
	t, err := d.bytes(dst, n)
	if err != nil {
		return err
	}
	copy(t, s)
	d.copies.Add(1)
	return nil
}

func (d *fakeRowDevice) Sync() error { return nil }

// fakeDevLink is a hop's device link over its in-process pipe.
type fakeDevLink struct {
	transport.Link
	dev  *fakeRowDevice
	sent *atomic.Int64 // device payloads sent
}

func (l *fakeDevLink) Send(ctx context.Context, m *transport.Message) error {
	c := transport.Message{Header: m.Header}
	for i, p := range m.Payloads {
		if p.Dev == 0 {
			return fmt.Errorf("fake nccl link: payload %d is in host memory", i)
		}
		b, err := l.dev.bytes(p.Dev, p.Bytes)
		if err != nil {
			return err
		}
		c.Payloads = append(c.Payloads, transport.HostBuffer(append([]byte(nil), b...)))
		l.sent.Add(1)
	}
	return l.Link.Send(ctx, &c)
}

func (l *fakeDevLink) Recv(ctx context.Context, m *transport.Message) error {
	var c transport.Message // fresh: m keeps its header while the next arrives
	if err := l.Link.Recv(ctx, &c); err != nil {
		return err
	}
	m.Header = c.Header
	if len(m.Payloads) < len(c.Payloads) {
		return fmt.Errorf("fake nccl link: %d tensors arrive, %d device buffers given", len(c.Payloads), len(m.Payloads))
	}
	m.Payloads = m.Payloads[:len(c.Payloads)]
	for i, p := range c.Payloads {
		b := &m.Payloads[i]
		if b.Dev == 0 || b.Bytes < int64(len(p.Host)) {
			return fmt.Errorf("fake nccl link: payload %d: %d bytes arrive, the device buffer holds %d", i, len(p.Host), b.Bytes)
		}
		dst, err := l.dev.bytes(b.Dev, int64(len(p.Host)))
		if err != nil {
			return err
		}
		copy(dst, p.Host)
		b.Bytes = int64(len(p.Host))
	}
	return nil
}

type fakeHops struct {
	dev    *fakeRowDevice
	sent   atomic.Int64
	closed atomic.Bool
}

func fakeHopsFunc(made *[]*fakeHops, mu *sync.Mutex) devHopsFunc {
	return func(be kernels.Backend) (devHops, error) {
		h := &fakeHops{dev: newFakeRowDevice(be)}
		mu.Lock()
		*made = append(*made, h)
		mu.Unlock()
		return h, nil
	}
}

func (h *fakeHops) device() rowDevice { return h.dev }

func (h *fakeHops) hop(ctx context.Context, ctl transport.Link, send bool) (transport.Link, error) {
	id := []byte("fake-unique-id")
	msg := func() *transport.Message {
		return &transport.Message{Header: transport.Header{Kind: transport.KindControl,
			Tensors: []transport.TensorMeta{{DType: transport.DTypeBytes, Shape: []int64{int64(len(id))}, Bytes: int64(len(id))}}},
			Payloads: []transport.Buffer{transport.HostBuffer(id)}}
	}
	var m transport.Message
	if send { // id out, then wait for the peer to join
		if err := ctl.Send(ctx, msg()); err != nil {
			return nil, err
		}
		if err := ctl.Recv(ctx, &m); err != nil {
			return nil, fmt.Errorf("fake init: %w", err)
		}
	} else {
		if err := ctl.Recv(ctx, &m); err != nil {
			return nil, fmt.Errorf("fake id: %w", err)
		}
		if m.Header.Kind != transport.KindControl {
			return nil, fmt.Errorf("fake id: a %v message", m.Header.Kind)
		}
		if err := ctl.Send(ctx, msg()); err != nil {
			return nil, err
		}
	}
	return &fakeDevLink{Link: ctl, dev: h.dev, sent: &h.sent}, nil
}

func (h *fakeHops) close() error { h.closed.Store(true); return nil }

func noHops(kernels.Backend) (devHops, error) { return nil, errors.New("no NCCL here") }

// devicePipeline is inProcessPipelineStages with device rows: every stage
// serves with serveRing (want: its --pipeline-link) and the fake hops.
type devicePipeline struct {
	head  *Engine
	ring  *Ring
	hops  []*fakeHops // the head's and the stages'
	links [][2]transport.Link
	errs  chan error
	wg    sync.WaitGroup
}

func startDevicePipeline(t *testing.T, dir string, bounds []int, opt EngineOptions, ropt RingOptions, want PipelineLink, stageHops devHopsFunc) (*devicePipeline, error) {
	t.Helper()
	p := &devicePipeline{head: loadHeadEngine(t, dir, bounds[1], opt)}
	var mu sync.Mutex
	if stageHops == nil {
		stageHops = fakeHopsFunc(&p.hops, &mu)
	}
	if ropt.hops == nil {
		ropt.hops = fakeHopsFunc(&p.hops, &mu)
	}
	S := len(bounds) - 1
	p.errs = make(chan error, S)
	for i := range S {
		a, b := transport.Pipe(fmt.Sprintf("stage%d", i), fmt.Sprintf("stage%d", (i+1)%S), 64<<20, transport.DefaultLimits())
		p.links = append(p.links, [2]transport.Link{a, b})
	}
	for i := 1; i < S; i++ {
		sbe, sw := loadFixtureSelection(t, dir, stageSelection(bounds[i], bounds[i+1]))
		st, err := NewStage(sbe, sw)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(st.Close)
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.errs <- serveRing(context.Background(), st, p.links[i-1][1], p.links[i][0], want, stageHops)
		}()
	}
	t.Cleanup(p.stop)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var err error
	p.ring, err = ConnectRing(ctx, p.head, p.links[0][0], p.links[S-1][1], ropt)
	return p, err
}

// stop closes every link and waits for the stages (10 s at most).
func (p *devicePipeline) stop() {
	if p.ring != nil {
		p.ring.Close()
		p.ring = nil
	}
	for _, l := range p.links {
		l[0].Close()
		l[1].Close()
	}
	done := make(chan struct{})
	go func() { p.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		panic("a stage still serving 10 s after its links closed")
	}
}

// stageErr is the first stage's result (waiting up to 5 s).
func (p *devicePipeline) stageErr(t *testing.T) error {
	t.Helper()
	select {
	case err := <-p.errs:
		return err
	case <-time.After(5 * time.Second):
		t.Fatal("no stage ended within 5 s")
		return nil
	}
}

// TestPipelineDeviceRowsBitIdentical: a ring of device rows (fake NCCL
// hops) gives the single-process logits bit for bit, on both fixtures,
// with 2 and 3 stages; every hop moved device payloads and the head copied
// each answer from its receive buffer.
func TestPipelineDeviceRowsBitIdentical(t *testing.T) {
	for _, fx := range fixtures {
		dir := fixtureDir(fx)
		want := stepScript(t, wholeEngine(t, dir, testEngineOpt))
		for _, S := range stageCounts {
			t.Run(fmt.Sprintf("%s/%dstages", fx, S), func(t *testing.T) {
				p, err := startDevicePipeline(t, dir, splitLayers(numLayers(t, dir), S), testEngineOpt,
					RingOptions{Link: LinkNCCL, StepTimeout: 10 * time.Second}, LinkAuto, nil)
				if err != nil {
					t.Fatal(err)
				}
				if _, ok := p.ring.rows.(*deviceRows); !ok {
					t.Fatalf("the ring moves rows with %T, want device rows", p.ring.rows)
				}
				compareLogits(t, stepScript(t, p.head), want)
				if len(p.hops) != S {
					t.Fatalf("%d processes formed hops, want %d", len(p.hops), S)
				}
				for i, h := range p.hops {
					if h.sent.Load() == 0 {
						t.Errorf("process %d sent no device payload", i)
					}
				}
				if p.hops[0].dev.copies.Load() != int64(len(want)) {
					t.Errorf("the head copied %d answers into its steps, want %d", p.hops[0].dev.copies.Load(), len(want))
				}
				p.stop()
				for _, h := range p.hops {
					if !h.closed.Load() {
						t.Error("a process's hops were not closed with its ring")
					}
				}
			})
		}
	}
}

// TestPipelineDeviceRowsMicroBatches: S micro-batches in flight round S
// stages on device rows give the single-process scheduler's tokens.
func TestPipelineDeviceRowsMicroBatches(t *testing.T) {
	dir := fixtureDir("tiny")
	items, want := referenceWork(t, dir, schedOpt)
	const S = 3
	p, err := startDevicePipeline(t, dir, splitLayers(numLayers(t, dir), S), smallKV,
		RingOptions{Link: LinkNCCL, MicroBatches: S, StepTimeout: 10 * time.Second}, LinkNCCL, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := NewScheduler(p.head, schedOpt)
	compareWork(t, runWorkload(t, s, items), want)
	s.Close()
	if p.ring.pipe.peak != S {
		t.Errorf("at most %d micro-batches were in flight, want %d", p.ring.pipe.peak, S)
	}
}

// TestDeviceRowsLinkAgreement: head and stage must agree on the link;
// where they cannot the ring fails to connect within its deadline, and the
// stage says why. auto falls back to TCP where NCCL cannot be had.
func TestDeviceRowsLinkAgreement(t *testing.T) {
	cases := []struct {
		name      string
		head      PipelineLink
		headHops  devHopsFunc // nil: the fake
		stage     PipelineLink
		stageHops devHopsFunc
		hostStage bool   // ServeStage: host rows only
		headErr   string // "" : connects
		stageErr  string
	}{
		{name: "nccl/auto", head: LinkNCCL, stage: LinkAuto},
		{name: "auto-without-nccl/auto", head: LinkAuto, headHops: noHops, stage: LinkAuto},
		{name: "tcp/tcp", head: LinkTCP, stage: LinkTCP},
		{name: "nccl/tcp", head: LinkNCCL, stage: LinkTCP, headErr: "did not come back", stageErr: "--pipeline-link tcp"},
		{name: "tcp/nccl", head: LinkTCP, stage: LinkNCCL, headErr: "did not come back", stageErr: "--pipeline-link nccl"},
		{name: "nccl/stage-without-nccl", head: LinkNCCL, stage: LinkAuto, stageHops: noHops, headErr: "did not come back", stageErr: "no NCCL here"},
		{name: "nccl/ServeStage", head: LinkNCCL, hostStage: true, headErr: "did not come back", stageErr: "ServeLink"},
		{name: "nccl-without-nccl", head: LinkNCCL, headHops: noHops, stage: LinkAuto, headErr: "no NCCL here"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			head, st, a, b := tinyHeadAndStage(t)
			back, ret := transport.Pipe("stage1", "head", 64<<20, transport.DefaultLimits())
			t.Cleanup(func() { back.Close(); ret.Close() })
			var made []*fakeHops
			var mu sync.Mutex
			stageHops := c.stageHops
			if stageHops == nil {
				stageHops = fakeHopsFunc(&made, &mu)
			}
			errs := make(chan error, 1)
			go func() {
				if c.hostStage {
					errs <- ServeStage(context.Background(), st, b, back)
					return
				}
				errs <- serveRing(context.Background(), st, b, back, c.stage, stageHops)
			}()
			ropt := RingOptions{Link: c.head, StepTimeout: 2 * time.Second, hops: c.headHops}
			if ropt.hops == nil {
				ropt.hops = fakeHopsFunc(&made, &mu)
			}
			start := time.Now()
			ring, err := ConnectRing(context.Background(), head, a, ret, ropt)
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("ConnectRing took %v", d)
			}
			if c.headErr != "" {
				if err == nil || !strings.Contains(err.Error(), c.headErr) {
					t.Fatalf("ConnectRing: %v, want an error with %q", err, c.headErr)
				}
				if c.stageErr == "" {
					return // the head refused before the stage heard of it
				}
				select {
				case serr := <-errs:
					if serr == nil || !strings.Contains(serr.Error(), c.stageErr) {
						t.Errorf("stage: %v, want an error with %q", serr, c.stageErr)
					}
				case <-time.After(5 * time.Second):
					t.Error("the stage was still serving 5 s after refusing")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			// One step round the ring, then the head ends it.
			var s Seq
			res, err := head.Step([]StepInput{{Seq: &s, Tokens: []int32{1, 2, 3}}}, false)
			if err != nil {
				t.Fatal(err)
			}
			res.Release()
			head.KV.Release(&s)
			_, device := ring.rows.(*deviceRows)
			if wantDev := c.head == LinkNCCL || c.head == LinkAuto && c.headHops == nil; device != wantDev {
				t.Errorf("device rows %v, want %v", device, wantDev)
			}
			ring.Close()
			a.Close()
			if err := <-errs; err != nil {
				t.Errorf("stage: %v", err)
			}
		})
	}
}

// TestDeviceRowsRefuseOversizedSteps: a step larger than the receive
// buffers (RingOptions.MaxTokens) fails at the head, before it is sent,
// naming the bound.
func TestDeviceRowsRefuseOversizedSteps(t *testing.T) {
	dir := fixtureDir("tiny")
	p, err := startDevicePipeline(t, dir, splitLayers(numLayers(t, dir), 2), testEngineOpt,
		RingOptions{Link: LinkNCCL, MaxTokens: 8, StepTimeout: 5 * time.Second}, LinkAuto, nil)
	if err != nil {
		t.Fatal(err)
	}
	var s Seq
	defer p.head.KV.Release(&s)
	toks := make([]int32, 9)
	_, err = p.head.Step([]StepInput{{Seq: &s, Tokens: toks}}, false)
	if err == nil || !strings.Contains(err.Error(), "MaxTokens") {
		t.Fatalf("a step of 9 tokens with buffers of 8: %v", err)
	}
}

// TestDeviceRowsRingFailsWhenAStageDies: the stage's links go away after a
// step; the next step fails within the step timeout, and later ones at once.
func TestDeviceRowsRingFailsWhenAStageDies(t *testing.T) {
	dir := fixtureDir("tiny")
	p, err := startDevicePipeline(t, dir, splitLayers(numLayers(t, dir), 2), testEngineOpt,
		RingOptions{Link: LinkNCCL, StepTimeout: 300 * time.Millisecond}, LinkAuto, nil)
	if err != nil {
		t.Fatal(err)
	}
	var s Seq
	defer p.head.KV.Release(&s)
	res, err := p.head.Step([]StepInput{{Seq: &s, Tokens: []int32{1, 2, 3}}}, false)
	if err != nil {
		t.Fatal(err)
	}
	res.Release()
	p.links[0][1].Close() // the stage's input and output go away
	p.links[1][0].Close()
	start := time.Now()
	if _, err := p.head.Step([]StepInput{{Seq: &s, Tokens: []int32{4}}}, false); !errors.Is(err, ErrPipelineDown) {
		t.Fatalf("step without its stage: %v, want ErrPipelineDown", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("the failed step took %v", d)
	}
	if _, err := p.head.Step([]StepInput{{Seq: &s, Tokens: []int32{5}}}, false); err == nil || p.ring.Err() == nil {
		t.Fatalf("a later step: %v (ring error %v)", err, p.ring.Err())
	}
}

func TestParsePipelineLink(t *testing.T) {
	for _, c := range []struct {
		in   string
		want PipelineLink
		bad  bool
	}{
		{"", LinkAuto, false}, {"tcp", LinkTCP, false}, {"NCCL", LinkNCCL, false}, {" auto ", LinkAuto, false},
		{"rdma", "", true},
	} {
		got, err := ParsePipelineLink(c.in)
		if (err != nil) != c.bad || got != c.want {
			t.Errorf("ParsePipelineLink(%q) = %q, %v", c.in, got, err)
		}
	}
}

// TestResolveLinkOnCPU: the CPU backend has no NCCL hops: auto is TCP,
// nccl an error that says why.
func TestResolveLinkOnCPU(t *testing.T) {
	be := cpu.New(0)
	for _, c := range []struct {
		want    PipelineLink
		got     PipelineLink
		errPart string
	}{
		{"", LinkTCP, ""}, {LinkTCP, LinkTCP, ""}, {LinkAuto, LinkTCP, ""},
		{LinkNCCL, "", "no device memory"}, {"ib", "", "want tcp, nccl or auto"},
	} {
		got, hops, err := resolveLink(be, c.want, openNCCLHops)
		if got != c.got || hops != nil || (c.errPart == "") != (err == nil) || err != nil && !strings.Contains(err.Error(), c.errPart) {
			t.Errorf("resolveLink(%q) = %q, %v, %v; want %q, error with %q", c.want, got, hops, err, c.got, c.errPart)
		}
	}
}

// cappedBackend is a CPU backend whose allocator is capped, as a head
// engine caps its GPU backend at its memory plan.
type cappedBackend struct {
	kernels.Backend
	limit int64
}

func (c *cappedBackend) DeviceMemory() (int64, int64, error) { return 0, 0, nil }
func (c *cappedBackend) MemoryStats() kernels.MemoryStats    { return kernels.MemoryStats{Limit: c.limit} }
func (c *cappedBackend) ResetPeakMemory()                    {}
func (c *cappedBackend) SetMemoryLimit(n int64)              { c.limit = n }

// TestDeviceRowsBuffersOutsideThePlan: the receive buffers raise a capped
// allocator's cap by their size, and their release lowers it again; an
// uncapped one stays uncapped.
func TestDeviceRowsBuffersOutsideThePlan(t *testing.T) {
	for _, start := range []int64{0, 1 << 30} {
		be := &cappedBackend{Backend: cpu.New(0), limit: start}
		d, err := newDeviceRows(be, newFakeRowDevice(be.Backend), 16, 64)
		if err != nil {
			t.Fatal(err)
		}
		for range 3 {
			if err := d.attach(&transport.Message{}); err != nil {
				t.Fatal(err)
			}
		}
		want := start
		if start > 0 {
			want += 3 * d.size
		}
		if be.limit != want {
			t.Errorf("cap %d with three buffers of %d, want %d", be.limit, d.size, want)
		}
		d.release()
		if be.limit != start {
			t.Errorf("cap %d after release, want %d", be.limit, start)
		}
	}
}

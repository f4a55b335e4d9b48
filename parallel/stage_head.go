package parallel

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/transport"
)

// RemoteLayers runs the decoder layers after a head engine's own: the
// residual stream h [T, hidden] of the step's inputs goes round the ring of
// stages and comes back as the last layer's output, in place. Inputs' Seq
// Len is still the step's first position when it is called.
type RemoteLayers interface {
	Layers(inputs []StepInput, h *kernels.Tensor) error
}

// checkLayers refuses a step of an engine that holds only the first layers
// and has no stages to run the rest (once constructed: the profile and
// warm-up steps of a head engine run over its own layers only).
func (e *Engine) checkLayers(inputs []StepInput) error {
	if e.remote == nil && !e.warming && e.ownLayers() < e.Cfg.NumHiddenLayers && e.plan.KVBlocks > 0 {
		return fmt.Errorf("engine: holds layers [0,%d) of %d and no pipeline stages are attached", e.ownLayers(), e.Cfg.NumHiddenLayers)
	}
	return nil
}

func (e *Engine) runRemote(inputs []StepInput, h *kernels.Tensor) error {
	if e.remote == nil {
		return e.checkLayers(inputs)
	}
	return e.remote.Layers(inputs, h)
}

// Ring is the head's side of a pipeline: it sends each step's header and
// hidden rows to the next stage and receives the last stage's rows. It
// tracks which blocks the stages already know of every sequence, so each
// header lists exactly the blocks given and freed since. A sequence is
// known by its first block (the head's blocks have one owner each, and the
// speculative verify step's per-token views share their sequence's table).
// Steps come back in the order they were sent: one at a time through
// Layers, or several in flight with RingOptions.MicroBatches
// (stage_sched.go); a goroutine reads the answers as they come, so that a
// send never waits on an answer the head has not read (stage_recv.go). A
// failed step breaks the ring for good: every later step fails at once.
type Ring struct {
	be       kernels.Backend
	out, in  transport.Link
	hidden   int
	timeout  time.Duration
	step     uint64
	nextID   uint64
	released []int32       // blocks the head's pool got back since the last step
	pending  []ringPending // steps sent whose rows are not back, oldest first
	pipe     *headPipe     // the scheduler's micro-batches in flight (stage_sched.go); nil: one at a time
	// microBatch is the next send's micro-batch slot (submitMicroBatch sets it).
	microBatch uint32
	// autoDepth: MicroBatches was "one per stage"; a speculating scheduler
	// adds one (draftSlot).
	autoDepth, drafted bool
	seqs               map[int32]*ringSeq // by the sequence's first block
	owner              map[int32]int32    // block → the first block of the sequence the stages think holds it
	err                error
	msg                transport.Message
	rows               rowMover      // host or device payloads (rows.go, rows_device.go)
	closeDev           func()        // frees the device links' resources after Close (nil: none)
	rx                 *ringReceiver // reads the last stage's answers (stage_recv.go)
	stepTime           time.Duration
	waitTime           time.Duration // the head idle in recv, waiting for an answer
	sent               map[uint64]time.Time
	rtt                time.Duration // summed send-to-answer times of the steps
	mu                 sync.Mutex    // guards err and the counters, read by Err and Stats
	steps              int64
	head               stepRecorder  // the head stage's own steps (StepStats)
	lastEnd            time.Time     // when the last synchronous step's answer was in
	lastWait           time.Duration // the last recv's wait for its answer
}

type ringSeq struct {
	id     uint64
	blocks []int32 // blocks the stages were told of
	len    int     // tokens the stages hold
	step   uint64  // the last step that carried it
}

// draftSlot gives a ring of "one micro-batch per stage" one more, once,
// for a scheduler that speculates: the design's S+1, so that the head's MTP
// draft (about one MoE layer) is hidden behind the micro-batches downstream.
// Call it before the first step.
func (r *Ring) draftSlot() error {
	if !r.autoDepth || r.drafted || r.pipe == nil || len(r.pipe.flight) > 0 {
		return nil
	}
	p, err := newHeadPipe(r.pipe.depth + 1)
	if err != nil {
		return err
	}
	r.pipe, r.drafted = p, true
	return nil
}

// RingOptions configure ConnectRing.
type RingOptions struct {
	// StepTimeout bounds one step's round trip (default 5 s): a stage that
	// stops answering fails the step, and with it the requests in flight.
	StepTimeout time.Duration
	// MicroBatches is how many micro-batches the head's scheduler keeps in
	// the ring (stage_sched.go): S stages need S to keep every stage busy
	// during decode. 0 or 1: one step at a time; negative: one per stage,
	// and one more under a speculating scheduler (draftSlot): its MTP draft
	// at the head makes S+1 the number that hides the head's work.
	MicroBatches int
	// Link is how the rows travel (stage_link.go): "" or LinkTCP host rows
	// on the given links; LinkNCCL device rows through a communicator per
	// hop, formed over them once the configuration is round (the CUDA
	// backend and libnccl needed); LinkAuto NCCL where it can.
	Link PipelineLink
	// MaxTokens is the largest step the ring carries, which sizes the
	// device receive buffers (default: the head's step workspace, i.e.
	// --max-num-batched-tokens).
	MaxTokens int
	// hops opens the device links (nil: NCCL; the CPU tests fake it).
	hops devHopsFunc
}

// ConnectRing makes e the head of a pipeline whose next stage is behind out
// and whose last stage answers on in (the same link with two stages). It
// sends the ring configuration round and checks that the stages' layer
// ranges continue e's and end at the model's last layer.
func ConnectRing(ctx context.Context, e *Engine, out, in transport.Link, opt RingOptions) (*Ring, error) {
	if opt.StepTimeout <= 0 {
		opt.StepTimeout = 5 * time.Second
	}
	cfg := &RingConfig{ConfigHash: configHash(e.Cfg), Hidden: e.Cfg.HiddenSize, NumBlocks: e.KV.NumBlocks,
		BlockSize: e.KV.BlockSize, KVDType: int(e.kvDType), Ranges: [][2]int{{0, e.ownLayers()}}}
	if e.graphs != nil {
		cfg.NumBlocks++ // the graphs' scratch block is an id too (kvcache.go takeScratch)
	}
	if opt.hops == nil {
		opt.hops = openNCCLHops
	}
	link, hops, err := resolveLink(e.BE, opt.Link, opt.hops)
	if err != nil {
		return nil, err
	}
	if link == LinkNCCL {
		if opt.MaxTokens <= 0 {
			opt.MaxTokens = e.MaxStepTokens()
		}
		if opt.MaxTokens <= 0 {
			hops.close()
			return nil, errors.New("ring: device rows need RingOptions.MaxTokens (the largest step)")
		}
		cfg.Link, cfg.MaxTokens = link, opt.MaxTokens
	}
	got, err := sendRingConfig(ctx, cfg, out, in, opt.StepTimeout)
	if err == nil {
		err = checkRanges(got.Ranges, e.Cfg.NumHiddenLayers)
	}
	if err != nil {
		if hops != nil {
			hops.close()
		}
		return nil, err
	}
	r := &Ring{be: e.BE, out: out, in: in, hidden: e.Cfg.HiddenSize, timeout: opt.StepTimeout,
		seqs: map[int32]*ringSeq{}, owner: map[int32]int32{}, rows: &hostRows{be: e.BE}}
	if hops != nil {
		if err := r.useDeviceRows(ctx, hops, opt.MaxTokens); err != nil {
			return nil, err
		}
	}
	if opt.MicroBatches < 0 {
		opt.MicroBatches = len(got.Ranges)
		r.autoDepth = true
	}
	if opt.MicroBatches > 1 {
		if r.pipe, err = newHeadPipe(opt.MicroBatches); err != nil {
			r.dropDeviceLinks()
			return nil, err
		}
	}
	if r.rx, err = startRingReceiver(r.in, max(opt.MicroBatches, 1), r.rows); err != nil {
		r.dropDeviceLinks()
		return nil, err
	}
	e.KV.released = func(b []int32) { r.released = append(r.released, b...) }
	e.remote = r
	return r, nil
}

func checkRanges(ranges [][2]int, layers int) error {
	end := 0
	for i, r := range ranges {
		if r[0] != end || r[1] <= r[0] {
			return fmt.Errorf("%w: ring stage %d holds layers [%d,%d) after layer %d (ranges %v)", ErrStageProtocol, i, r[0], r[1], end, ranges)
		}
		end = r[1]
	}
	if end != layers || len(ranges) < 2 {
		return fmt.Errorf("%w: ring stages hold layers %v; the model has %d", ErrStageProtocol, ranges, layers)
	}
	return nil
}

// Err is the error that broke the ring, or nil.
func (r *Ring) Err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

// ErrPipelineDown marks a step that the ring could not run: a stage or a
// link failed (this step or an earlier one). The API answers 503.
var ErrPipelineDown = errors.New("pipeline stage unavailable")

// Layers implements RemoteLayers.
func (r *Ring) Layers(inputs []StepInput, h *kernels.Tensor) error {
	if err := r.broken(); err != nil {
		return err
	}
	start := time.Now()
	continued, prevEnd := r.continues(inputs), r.lastEnd
	if err := r.fail(r.roundTrip(inputs, h)); err != nil {
		return err
	}
	end := time.Now()
	r.lastEnd = end
	r.mu.Lock()
	r.steps++
	r.stepTime += end.Sub(start)
	r.mu.Unlock()
	r.recordSync(inputs, start, end, prevEnd, continued)
	return nil
}

// recordSync records a synchronous step in the head's StepStats. The
// head's compute of a step surrounds Layers, in the engine and the
// scheduler: the time from the previous step's answer to this step's send
// holds the previous step's lm_head and sampling and this one's embedding
// and first layers, so it is one step's head compute, provided the
// scheduler did not sit idle in between. It did not if a sequence of this
// step was in the previous one (the scheduler waits only with no sequence
// running); other steps count without a compute time.
func (r *Ring) recordSync(inputs []StepInput, start, end, prevEnd time.Time, continued bool) {
	T := 0
	for _, in := range inputs {
		T += len(in.Tokens)
	}
	if T == 0 {
		return
	}
	if !continued || prevEnd.IsZero() {
		r.head.count(T)
		return
	}
	r.head.step(T, start.Sub(prevEnd)+end.Sub(start)-r.lastWait)
}

// continues reports whether a sequence of inputs was in the ring's last
// step.
func (r *Ring) continues(inputs []StepInput) bool {
	for _, in := range inputs {
		if len(in.Seq.Blocks) == 0 {
			continue
		}
		if t := r.seqs[in.Seq.Blocks[0]]; t != nil && t.step == r.step {
			return true
		}
	}
	return false
}

func (r *Ring) broken() error {
	if r.err != nil {
		return fmt.Errorf("broken earlier: %w", r.err)
	}
	return nil
}

// fail breaks the ring with err (nil: nothing).
func (r *Ring) fail(err error) error {
	if err == nil {
		return nil
	}
	err = fmt.Errorf("%w: %w", ErrPipelineDown, err)
	r.mu.Lock()
	r.err = err // only the stepping goroutine writes it; Err reads it from others
	r.mu.Unlock()
	r.pending = nil
	clear(r.sent)
	return err
}

// sendChecked and recvChecked are send and recv for micro-batches in
// flight, breaking the ring on failure as Layers does.
func (r *Ring) sendChecked(inputs []StepInput, h *kernels.Tensor) error {
	if err := r.broken(); err != nil {
		return err
	}
	return r.fail(r.send(inputs, h))
}

func (r *Ring) recvChecked(h *kernels.Tensor) error {
	if err := r.broken(); err != nil {
		return err
	}
	if err := r.fail(r.recv(h)); err != nil {
		return err
	}
	r.mu.Lock()
	r.steps++
	r.mu.Unlock()
	return nil
}

func (r *Ring) roundTrip(inputs []StepInput, h *kernels.Tensor) error {
	if err := r.send(inputs, h); err != nil {
		return err
	}
	return r.recv(h)
}

// ringPending is a step sent round the ring whose rows are not back yet.
type ringPending struct {
	step uint64
	T    int
}

// send sends a step's header and rows to the next stage; recv reads the
// answers in the order the steps were sent.
func (r *Ring) send(inputs []StepInput, h *kernels.Tensor) error {
	r.step++
	hd := &r.msg.Header
	*hd = transport.Header{Step: r.step, MicroBatch: r.microBatch, Kind: transport.KindActivations, Seqs: r.freed(inputs)}
	r.microBatch = 0 // a synchronous step (or a frees-only flush) is micro-batch 0
	T := 0
	for _, in := range inputs {
		hd.Seqs = append(hd.Seqs, r.meta(in))
		T += len(in.Tokens)
	}
	r.msg.Payloads = r.msg.Payloads[:0]
	if T > 0 {
		if err := r.packRows(h, T); err != nil {
			return err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), r.timeout)
	defer cancel()
	start := time.Now()
	if err := r.out.Send(ctx, &r.msg); err != nil {
		return fmt.Errorf("ring step %d: %w", r.step, err)
	}
	r.sentAt(r.step, start)
	for _, in := range inputs {
		r.seqs[in.Seq.Blocks[0]].len = in.Seq.Len + len(in.Tokens)
	}
	r.pending = append(r.pending, ringPending{step: r.step, T: T})
	return nil
}

// recv reads the oldest step's final hidden rows into h (nil for a step of
// no tokens), checking the step id and the rows against what was sent.
func (r *Ring) recv(h *kernels.Tensor) error {
	if len(r.pending) == 0 {
		return errors.New("ring: no step in flight")
	}
	p := r.pending[0]
	r.pending = r.pending[1:]
	waitStart := time.Now()
	a, err := r.rx.next(r.timeout)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("ring step %d: no answer from the last stage in %v: %w", p.step, r.timeout, err)
		}
		return fmt.Errorf("ring step %d: %w", p.step, err)
	}
	defer r.rx.release(a.m)
	r.answered(p.step, waitStart, a.at)
	back := a.m
	bh := &back.Header
	want := 0
	if p.T > 0 {
		want = 1
	}
	if bh.Kind != transport.KindFinalHidden || bh.Step != p.step || len(back.Payloads) != want {
		return fmt.Errorf("%w: ring step %d answered by step %d, kind %v, %d payloads", ErrStageProtocol, p.step, bh.Step, bh.Kind, len(back.Payloads))
	}
	if p.T == 0 {
		return nil // a step that only announced frees
	}
	seqs := []transport.SeqMeta{{Tokens: int32(p.T)}}
	if _, err := checkRows(&transport.Header{Step: bh.Step, Tensors: bh.Tensors, Seqs: seqs}, r.hidden, int(back.Payloads[0].Len())); err != nil {
		return err
	}
	if h == nil || h.Rows() != p.T {
		return fmt.Errorf("ring step %d: %d rows back and no tensor of that many rows to hold them", p.step, p.T)
	}
	if err := r.rows.take(h, back.Payloads[0]); err != nil {
		return fmt.Errorf("ring step %d: %w", p.step, err)
	}
	return nil
}

// packRows puts h's T rows (f32, as the engine keeps them: bit-identical
// to one process) in the message, reusing the last payload's buffer.
func (r *Ring) packRows(h *kernels.Tensor, T int) error {
	if h == nil || h.Rows() != T || h.Cols() != r.hidden {
		return fmt.Errorf("ring step %d: hidden rows %v for %d tokens of width %d", r.step, h, T, r.hidden)
	}
	n := 4 * T * r.hidden
	p, err := r.rows.payload(h, n)
	if err != nil {
		return fmt.Errorf("ring step %d: %w", r.step, err)
	}
	r.msg.Header.Tensors = []transport.TensorMeta{{DType: transport.DTypeF32, Shape: []int64{int64(T), int64(r.hidden)}, Bytes: int64(n)}}
	r.msg.Payloads = append(r.msg.Payloads, p)
	return nil
}

// Flush tells the stages of the blocks the head freed since the last step,
// in a step of no tokens (the frees otherwise travel with the next step).
// Call it from the goroutine that steps the engine, or while it is idle.
func (r *Ring) Flush() error { return r.Layers(nil, nil) }

// freed lists, as block-freeing entries, every sequence the stages know
// whose blocks the head released since (the pool reports each release), or
// whose blocks a sequence of this step holds, or that starts again at
// position 0 (preemption by recompute; its new blocks may be the same ids).
// Such a sequence continues under a new id.
func (r *Ring) freed(inputs []StepInput) []transport.SeqMeta {
	stale := map[int32]bool{}
	for _, b := range r.released {
		if k, ok := r.owner[b]; ok {
			stale[k] = true
		}
	}
	r.released = r.released[:0]
	for _, in := range inputs {
		if len(in.Seq.Blocks) == 0 {
			continue // Step's batch refuses it
		}
		key := in.Seq.Blocks[0]
		if t := r.seqs[key]; t != nil && (!isPrefix(t.blocks, in.Seq.Blocks) || (in.Seq.Len == 0 && t.len > 0)) {
			stale[key] = true
		}
		for _, b := range in.Seq.Blocks {
			if k, ok := r.owner[b]; ok && k != key {
				stale[k] = true
			}
		}
	}
	var out []transport.SeqMeta
	for key := range stale {
		t := r.seqs[key]
		for _, b := range t.blocks {
			delete(r.owner, b)
		}
		delete(r.seqs, key)
		out = append(out, transport.SeqMeta{ID: t.id, FreedBlocks: t.blocks})
	}
	slices.SortFunc(out, func(a, b transport.SeqMeta) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

func isPrefix(p, s []int32) bool { return len(p) <= len(s) && slices.Equal(p, s[:len(p)]) }

// meta is the header entry of one input, recording what the stages will know.
func (r *Ring) meta(in StepInput) transport.SeqMeta {
	key := in.Seq.Blocks[0]
	t := r.seqs[key]
	if t == nil {
		r.nextID++
		t = &ringSeq{id: r.nextID}
		r.seqs[key] = t
	}
	t.step = r.step
	m := transport.SeqMeta{ID: t.id, Position: int64(in.Seq.Len), Tokens: int32(len(in.Tokens)),
		NewBlocks: append([]int32(nil), in.Seq.Blocks[len(t.blocks):]...)}
	for _, b := range m.NewBlocks {
		r.owner[b] = key
	}
	t.blocks = append(t.blocks, m.NewBlocks...)
	return m
}

// RingStats are the head's view of the ring.
type RingStats struct {
	Steps    int64
	StepTime time.Duration // summed synchronous steps (Layers: send, the stages' layers, receive)
	// RoundTrip sums, over the steps, the time from the start of a step's
	// send to its answer's arrival (the links' hops and the stages' layers,
	// and any queueing behind other micro-batches).
	RoundTrip time.Duration
	// HeadWait sums the time the head sat idle waiting for an answer: the
	// head's bubble (0 when the ring always answers before it asks).
	HeadWait time.Duration
}

// StepStats returns the head stage's counters (Idle: its waits for the
// last stage's answers); safe while the head steps.
func (r *Ring) StepStats() StepStats {
	s := r.head.snapshot()
	r.mu.Lock()
	defer r.mu.Unlock()
	s.Idle = r.waitTime
	return s
}

// Stats returns the ring's counters.
func (r *Ring) Stats() RingStats {
	r.mu.Lock()
	defer r.mu.Unlock()
	return RingStats{Steps: r.steps, StepTime: r.stepTime, RoundTrip: r.rtt, HeadWait: r.waitTime}
}

func (r *Ring) sentAt(step uint64, t time.Time) {
	if r.sent == nil {
		r.sent = map[uint64]time.Time{}
	}
	r.sent[step] = t
}

// answered records a step's round trip and the head's wait for it.
func (r *Ring) answered(step uint64, waitStart, arrived time.Time) {
	wait := time.Since(waitStart)
	r.lastWait = wait
	r.mu.Lock()
	defer r.mu.Unlock()
	if t, ok := r.sent[step]; ok {
		r.rtt += arrived.Sub(t)
		delete(r.sent, step)
	}
	r.waitTime += wait
}

// Close ends the ring: the stages see their input close and stop.
func (r *Ring) Close() error {
	err := r.out.Close()
	if r.in != r.out {
		err = errors.Join(err, r.in.Close())
	}
	if r.rx != nil {
		r.rx.stop()
	}
	if r.closeDev != nil { // once nothing reads or writes the device links
		r.closeDev()
		r.closeDev = nil
	}
	return err
}

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/node"
	"github.com/glmtopo/glmtopo/parallel"
	"github.com/glmtopo/glmtopo/serve"
	"github.com/glmtopo/glmtopo/transport/tcp"
	"github.com/glmtopo/glmtopo/transport/telemetry"
)

// nodeRuntime runs this host's stage of each active plan: the head (stage
// 0) loads the embedding, its layers, lm_head and MTP, connects the ring
// and serves the OpenAI API; the other stages run their layers. A new plan
// epoch stops the old stage first.
type nodeRuntime struct {
	cfg         serve.Config
	model       sourceFlags // --load-format, --hf-overrides (--model is the daemon's)
	tokenizer   *string
	backend     backendFlags
	mem         memoryFlags
	stepTimeout *time.Duration
	micro       *int
	link        *string             // --pipeline-link
	links       *telemetry.Registry // the data-plane links of every epoch's stage

	mu     sync.Mutex
	cancel context.CancelFunc
	done   chan struct{}
}

var _ node.Runtime = (*nodeRuntime)(nil)

func (r *nodeRuntime) AddFlags(fs *flag.FlagSet) {
	r.links = telemetry.NewRegistry()
	r.cfg = serve.DefaultConfig()
	r.cfg.RegisterFlags(fs)
	r.model = addSourceFlags(fs, "")
	r.tokenizer = fs.String("tokenizer", "", "the head's tokenizer.json (default: the model directory's)")
	r.backend = addBackendFlags(fs)
	r.mem = addMemoryFlags(fs, 2048)
	r.stepTimeout = fs.Duration("pipeline-step-timeout", 5*time.Second, "a step no stage answers within this fails with its requests")
	r.micro = fs.Int("pipeline-micro-batches", -1, "micro-batches the head keeps in the pipeline (-1: one per stage; 1: one at a time)")
	r.link = addPipelineLinkFlag(fs, parallel.LinkTCP, "how hidden rows travel between stages: tcp, nccl (device memory over NCCL: InfiniBand/RoCE) or auto (the head: nccl on CUDA with libnccl, else tcp; the others: the head's choice); every daemon of a cluster takes the same")
}

// Activate stops the previous epoch's stage and starts this one's.
func (r *nodeRuntime) Activate(plan node.ClusterPlan, mine node.StageAssignment, opts *node.Options) {
	r.stop()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	r.mu.Lock()
	r.cancel, r.done = cancel, done
	r.mu.Unlock()
	log := opts.Logger.With("epoch", plan.Epoch, "stage", mine.Stage, "layers", fmt.Sprintf("[%d,%d)", mine.Layers[0], mine.Layers[1]))
	go func() {
		defer close(done)
		opts.Stages.Set(plan.Epoch, node.StageLoading, "")
		if err := r.run(ctx, plan, mine, opts, log); err != nil && ctx.Err() == nil {
			log.Error("stage stopped", "err", err)
			opts.Stages.Set(plan.Epoch, node.StageFailed, err.Error())
		}
	}()
}

func (r *nodeRuntime) Close() { r.stop() }

func (r *nodeRuntime) stop() {
	r.mu.Lock()
	cancel, done := r.cancel, r.done
	r.cancel, r.done = nil, nil
	r.mu.Unlock()
	if cancel == nil {
		return
	}
	cancel()
	select {
	case <-done:
	case <-time.After(r.cfg.ShutdownTimeout + 10*time.Second):
		slog.Error("the previous plan's stage did not stop")
	}
}

func (r *nodeRuntime) run(ctx context.Context, plan node.ClusterPlan, mine node.StageAssignment, opts *node.Options, log *slog.Logger) error {
	src := r.model.at(opts.Model)
	link, err := parallel.ParsePipelineLink(*r.link)
	if err != nil {
		return err
	}
	S := len(plan.Stages)
	if S > 1 && opts.DataAddr == "" {
		return errors.New("a pipeline of several hosts needs --data-listen on every host")
	}
	ranks, err := r.stageRanks(mine, log)
	if err != nil {
		return err
	}
	be, kvDType, err := r.backend.open()
	if err != nil {
		return err
	}
	defer be.Close()
	key := tcp.Config{Name: opts.Name, Key: []byte(opts.PSK), Registry: r.links}
	if key.Name == "" {
		key.Name = fmt.Sprintf("stage%d", mine.Stage)
	}
	if mine.Stage == 0 {
		return r.runHead(ctx, src, be, kvDType, ranks, plan.Epoch, mine, S, opts, key, link, log)
	}
	next, err := nextDataAddr(plan, mine)
	if err != nil {
		return err
	}
	open := parallel.OpenStage
	if ranks.Enabled() {
		open = func(ctx context.Context, src parallel.ModelSource, be kernels.Backend, first, end int, p model.Progress) (*parallel.Stage, func(), error) {
			return parallel.OpenStageRanks(ctx, src, be, first, end, ranks, p)
		}
	}
	st, closeStage, err := open(ctx, src, be, mine.Layers[0], mine.Layers[1], nil)
	if err != nil {
		return err
	}
	defer closeStage()
	l, err := parallel.ListenStage(opts.DataAddr, key)
	if err != nil {
		return err
	}
	defer l.Close()
	log.Info("stage ready", "listen", l.Addr().String(), "next", next)
	opts.Stages.SetMetrics(plan.Epoch, func() node.StageMetrics { return r.stageMetrics(st.StepStats()) })
	opts.Stages.Set(plan.Epoch, node.StageReady, "")
	return l.ServeLink(ctx, st, next, link)
}

// nextDataAddr is where stage mine sends its rows: the next stage, or the
// head (known from stage 1's previous neighbour) for the last one.
func nextDataAddr(plan node.ClusterPlan, mine node.StageAssignment) (string, error) {
	if mine.Next != nil {
		if mine.Next.DataAddr == "" {
			return "", fmt.Errorf("stage %d's next host %s has no --data-listen", mine.Stage, mine.Next.Name)
		}
		return mine.Next.DataAddr, nil
	}
	for _, s := range plan.Stages {
		if s.Stage == 1 && s.Prev != nil && s.Prev.DataAddr != "" {
			return s.Prev.DataAddr, nil
		}
	}
	return "", errors.New("the plan names no head data address (stage 1's previous host has no --data-listen)")
}

func (r *nodeRuntime) runHead(ctx context.Context, src parallel.ModelSource, be kernels.Backend, kvDType kernels.DType, ranks parallel.RankOptions,
	epoch uint64, mine node.StageAssignment, S int, opts *node.Options, key tcp.Config, link parallel.PipelineLink, log *slog.Logger) error {
	opt := parallel.EngineOptions{Ranks: ranks}
	if err := r.mem.apply(&opt, kvDType, r.cfg.MaxNumSeqs, r.cfg.MaxModelLen); err != nil {
		return err
	}
	var eng *parallel.Engine
	if S == 1 {
		e, closeEngine, err := parallel.Open(ctx, src, be, opt, nil)
		if err != nil {
			return err
		}
		defer closeEngine()
		eng = e
	} else {
		if mine.Next == nil || mine.Next.DataAddr == "" {
			return errors.New("the head's next stage has no --data-listen")
		}
		opt.EnforceEager = true // steps leave the process mid-forward: no decode graphs
		e, closeHead, err := parallel.OpenHead(ctx, src, be, mine.Layers[1], opt, nil)
		if err != nil {
			return err
		}
		defer closeHead()
		l, err := parallel.ListenHead(opts.DataAddr, key)
		if err != nil {
			return err
		}
		defer l.Close()
		cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		ring, err := parallel.ConnectRingTCP(cctx, e, l, mine.Next.DataAddr, parallel.RingOptions{StepTimeout: *r.stepTimeout, MicroBatches: *r.micro, Link: link})
		cancel()
		if err != nil {
			return err
		}
		defer ring.Close()
		opts.Stages.SetMetrics(epoch, func() node.StageMetrics { return r.stageMetrics(ring.StepStats()) })
		eng = e
		log.Info("pipeline connected: every stage is ready", "stages", S)
	}
	tok, err := loadTokenizer(*r.tokenizer, src)
	if err != nil {
		return err
	}
	cfg := r.cfg
	if len(cfg.ServedModelNames) == 0 {
		cfg.ServedModelNames = []string{filepath.Base(filepath.Clean(opts.Model))}
	}
	sched := parallel.NewScheduler(eng, parallel.SchedulerOptions{MaxNumSeqs: cfg.MaxNumSeqs, MaxWaiting: cfg.MaxWaiting,
		MaxModelLen: cfg.MaxModelLen, PrefillTokens: *r.mem.batched})
	defer sched.Close()
	srv, err := serve.NewServer(cfg, sched, tok, log)
	if err != nil {
		return err
	}
	if S > 1 {
		if err := srv.RegisterCollector(telemetry.NewCollector(r.links)); err != nil {
			return err
		}
		if err := srv.RegisterCollector(node.NewStageCollector(opts.Stages)); err != nil { // every stage's counters
			return err
		}
	}
	log.Info("serving", "addr", cfg.Addr(), "stages", S)
	opts.Stages.Set(epoch, node.StageReady, "")
	return srv.ListenAndServe(ctx)
}

// stageMetrics is this host's stage's counters for status and the other
// members: its steps and its links (the registry holds the live epoch's).
func (r *nodeRuntime) stageMetrics(s parallel.StepStats) node.StageMetrics {
	return node.NewStageMetrics(s.Steps, s.Tokens, s.StepP50, s.StepP99, s.Busy, s.Idle, r.Links())
}

// Links reports this host's data-plane links for `glmtopo status`.
func (r *nodeRuntime) Links() []node.LinkStatus {
	if r.links == nil {
		return nil
	}
	snaps := r.links.Snapshots()
	out := make([]node.LinkStatus, 0, len(snaps))
	for _, s := range snaps {
		l := node.LinkStatus{Link: s.Link, Peer: s.Peer, BytesSent: s.BytesSent, BytesRecv: s.BytesRecv,
			MsgsSent: s.MsgsSent, MsgsRecv: s.MsgsRecv, SendP50us: s.SendP50us, SendP99us: s.SendP99us,
			RecvP50us: s.RecvP50us, RecvP99us: s.RecvP99us}
		if w := s.Wire; w != nil {
			l.WireSource, l.WireBytesSent, l.WireBytesRecv, l.Retransmits = w.Source, w.BytesSent, w.BytesRecv, w.Retransmits
		}
		out = append(out, l)
	}
	return out
}

// stageRanks is the rank layout this daemon runs its stage on: the flags'
// when --tensor-parallel-size is given (as `glmtopo stage` takes it), else
// the plan's: the planner sized the stage for its GPUs, TP and EP, and one
// GPU could not hold it. On --device cpu the plan's GPUs are ignored (an
// --inventory-override test cluster): the stage runs on one backend.
func (r *nodeRuntime) stageRanks(mine node.StageAssignment, log *slog.Logger) (parallel.RankOptions, error) {
	if *r.backend.tp > 1 {
		return r.backend.ranks()
	}
	n, tp, ep, err := planLayout(mine)
	if err != nil || n <= 1 {
		return parallel.RankOptions{}, err
	}
	switch d := *r.backend.device; {
	case d == "cpu":
		log.Warn("the plan puts this stage on several GPUs; --device cpu runs it on one backend", "gpus", mine.GPUs, "tp", tp, "ep", ep)
		return parallel.RankOptions{}, nil
	case d != "cuda" && d != "cuda:0":
		return parallel.RankOptions{}, fmt.Errorf("the plan puts stage %d on GPUs %v: their ranks take GPUs 0..%d (--device cuda; pick the GPUs with CUDA_VISIBLE_DEVICES), not --device %s", mine.Stage, mine.GPUs, n-1, d)
	}
	o, err := parallel.TensorParallelCUDA(n, false, cuda.Options{FastWideGemm: *r.backend.fastGemm}, log)
	if err != nil {
		return parallel.RankOptions{}, fmt.Errorf("stage %d of the plan: %w", mine.Stage, err)
	}
	o.TP, o.EP, o.Dispatch = tp, ep, *r.backend.dispatch
	log.Info("stage on the plan's GPUs", "gpus", mine.GPUs, "tp", tp, "ep", ep)
	return o, nil
}

// planLayout checks a stage's layout from the plan: GPUs 0..n-1 (a daemon
// drives its host's GPUs from the first), TP and EP dividing them. n is 0
// for a plan without GPUs (CPU plans).
func planLayout(mine node.StageAssignment) (n, tp, ep int, err error) {
	n = len(mine.GPUs)
	if n == 0 {
		return 0, 0, 0, nil
	}
	for i, g := range mine.GPUs {
		if g != i {
			return 0, 0, 0, fmt.Errorf("the plan puts stage %d on GPUs %v: a daemon drives its host's GPUs 0..n-1 (one stage per host)", mine.Stage, mine.GPUs)
		}
	}
	tp, ep = max(mine.TP, 1), max(mine.EP, 1)
	if n%tp != 0 || n%ep != 0 {
		return 0, 0, 0, fmt.Errorf("the plan's stage %d: TP %d and EP %d must divide its %d GPUs", mine.Stage, tp, ep, n)
	}
	return n, tp, ep, nil
}

package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/node"
	"github.com/glmtopo/glmtopo/parallel"
	"github.com/glmtopo/glmtopo/transport/tcp"
)

// runStage runs one executor stage of a pipeline whose head is
// `glmtopo serve --pipeline-head-layers K ...`.
func runStage(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("stage", stderr)
	model := addSourceFlags(fs, "checkpoint directory, or with --load-format dummy a preset name (required; the head's, as are the other two)")
	dir := model.path
	layers := fs.String("layers", "", "the stage's decoder layers FIRST:END (required)")
	listen := fs.String("listen", "127.0.0.1:0", "address the previous stage (or the head) dials")
	next := fs.String("next", "", "address of the next stage, or of the head's --pipeline-listen for the last stage (required)")
	name := fs.String("name", "", "this stage's name in the link handshake (default stage-FIRST-END)")
	keyFile := fs.String("cluster-key-file", "", "the cluster key file (glmtopo node cluster-key; required)")
	linkFlag := addPipelineLinkFlag(fs, parallel.LinkAuto, "how hidden rows travel: tcp, nccl (device memory, CUDA + libnccl) or auto (whatever the head chose)")
	backend := addBackendFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	link, lerr := parallel.ParsePipelineLink(*linkFlag)
	first, end, err := parseLayerRange(*layers)
	if err == nil {
		err = lerr
	}
	if *dir == "" || *next == "" || *keyFile == "" || err != nil || fs.NArg() != 0 {
		fmt.Fprintln(stderr, "usage: glmtopo stage --model DIR --layers FIRST:END --next ADDR --cluster-key-file FILE [--listen ADDR] [--device cuda]")
		if err != nil {
			fmt.Fprintln(stderr, err)
		}
		return errUsage
	}
	if *name == "" {
		*name = fmt.Sprintf("stage-%d-%d", first, end)
	}
	key, err := node.LoadClusterKey(*keyFile)
	if err != nil {
		return err
	}
	ranks, err := backend.ranks()
	if err != nil {
		return err
	}
	be, _, err := backend.open()
	if err != nil {
		return err
	}
	defer be.Close()
	src := model.source()
	var st *parallel.Stage
	var closeStage func()
	if ranks.Enabled() {
		st, closeStage, err = parallel.OpenStageRanks(ctx, src, be, first, end, ranks, progress(stderr, "load"))
	} else {
		st, closeStage, err = parallel.OpenStage(ctx, src, be, first, end, progress(stderr, "load"))
	}
	if err != nil {
		return err
	}
	defer closeStage()
	l, err := parallel.ListenStage(*listen, tcp.Config{Name: *name, Key: []byte(key)})
	if err != nil {
		return err
	}
	defer l.Close()
	fmt.Fprintf(stdout, "stage [%d,%d) listening on %s, next %s\n", first, end, l.Addr(), *next)
	slog.Info("stage serving", "layers", *layers, "listen", l.Addr().String(), "next", *next, "engine", be.Name(), "link", link)
	return l.ServeLink(ctx, st, *next, link)
}

// addPipelineLinkFlag is --pipeline-link (tcp, nccl or auto). A head
// defaults to tcp: NCCL on one GPU shared by two processes needs each its
// own NCCL_HOSTID, which auto cannot know; a stage defaults to auto,
// taking the head's choice.
func addPipelineLinkFlag(fs *flag.FlagSet, def parallel.PipelineLink, usage string) *string {
	return fs.String("pipeline-link", string(def), usage)
}

func parseLayerRange(s string) (first, end int, err error) {
	a, b, ok := strings.Cut(s, ":")
	if ok {
		first, err = strconv.Atoi(a)
		if err == nil {
			end, err = strconv.Atoi(b)
		}
	}
	if !ok || err != nil || first < 0 || end <= first {
		return 0, 0, fmt.Errorf("--layers %q: want FIRST:END with 0 ≤ FIRST < END", s)
	}
	return first, end, nil
}

// pipelineFlags make `glmtopo serve` the head stage of a pipeline: it holds
// the embedding, layers [0, K), lm_head and MTP, and runs the other layers
// on `glmtopo stage` processes joined in a ring of TCP links.
type pipelineFlags struct {
	headLayers *int
	first      *string
	listen     *string
	keyFile    *string
	timeout    *time.Duration
	micro      *int
	link       *string
}

func addPipelineFlags(fs *flag.FlagSet) pipelineFlags {
	return pipelineFlags{
		headLayers: fs.Int("pipeline-head-layers", 0, "run as a pipeline's head stage holding decoder layers [0, K) (0: the whole model in this process)"),
		first:      fs.String("pipeline-first", "", "address of the first `glmtopo stage` (its --listen)"),
		listen:     fs.String("pipeline-listen", "127.0.0.1:0", "address the last stage dials to return the final hidden rows (its --next)"),
		keyFile:    fs.String("pipeline-cluster-key-file", "", "the cluster key file the stages use"),
		timeout:    fs.Duration("pipeline-step-timeout", 5*time.Second, "a step that no stage answers within this fails with its requests"),
		micro:      fs.Int("pipeline-micro-batches", -1, "micro-batches kept in the pipeline (-1: one per stage, keeping every stage busy; 1: one at a time)"),
		link:       addPipelineLinkFlag(fs, parallel.LinkTCP, "how hidden rows travel between stages: tcp, nccl (device memory over NCCL: InfiniBand/RoCE) or auto (nccl on CUDA with libnccl, else tcp)"),
	}
}

// open makes the engine: the whole model, or the head stage with its ring.
func (p pipelineFlags) open(ctx context.Context, src parallel.ModelSource, be kernels.Backend, opt parallel.EngineOptions, prog model.Progress) (*parallel.Engine, func(), error) {
	if *p.headLayers == 0 {
		return parallel.Open(ctx, src, be, opt, prog)
	}
	if *p.first == "" || *p.keyFile == "" {
		return nil, nil, fmt.Errorf("--pipeline-head-layers needs --pipeline-first and --pipeline-cluster-key-file")
	}
	link, err := parallel.ParsePipelineLink(*p.link)
	if err != nil {
		return nil, nil, err
	}
	key, err := node.LoadClusterKey(*p.keyFile)
	if err != nil {
		return nil, nil, err
	}
	opt.EnforceEager = true // the head's steps leave the process mid-forward: no decode graphs
	eng, closeHead, err := parallel.OpenHead(ctx, src, be, *p.headLayers, opt, prog)
	if err != nil {
		return nil, nil, err
	}
	l, err := parallel.ListenHead(*p.listen, tcp.Config{Name: "head", Key: []byte(key)})
	if err != nil {
		closeHead()
		return nil, nil, err
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	slog.Info("connecting the pipeline", "head_layers", *p.headLayers, "first_stage", *p.first, "listen", l.Addr().String())
	ring, err := parallel.ConnectRingTCP(cctx, eng, l, *p.first, parallel.RingOptions{StepTimeout: *p.timeout, MicroBatches: *p.micro, Link: link})
	if err != nil {
		l.Close()
		closeHead()
		return nil, nil, err
	}
	slog.Info("pipeline connected: every stage is ready")
	return eng, func() { ring.Close(); l.Close(); closeHead() }, nil
}

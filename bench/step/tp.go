package step

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/topology"
	"github.com/glmtopo/glmtopo/transport/nccl"
)

// OneRankBudget is what the one-rank communicator may cost over the plain
// single-GPU path (issue 17's acceptance: ≤ 3% at batch 1/16/64, graphs on).
const OneRankBudget = 0.03

// minOneRankRounds is the fewest interleaved rounds the one-rank
// comparison times: a 3% budget needs medians steadier than --iters 10.
const minOneRankRounds = 30

// TPReport is --tensor-parallel-size N's part of the report.
type TPReport struct {
	Size           int     `json:"tensor_parallel_size"`
	ExpertParallel bool    `json:"expert_parallel"`
	GPU            string  `json:"gpu"` // catalog model of the rates not measured
	ReadBW         float64 `json:"hbm_read_bytes_per_s"`
	ReadBWSource   string  `json:"hbm_source"`
	AllReduceRate  string  `json:"all_reduce_source,omitempty"`
	// Timed says whether steps ran on Size GPUs (today: Size 1, through
	// the one-rank communicator); otherwise Floors are predictions only.
	Timed  bool        `json:"timed"`
	Note   string      `json:"note,omitempty"`
	Floors []RankFloor `json:"floors"` // one per decode batch
}

// OneRankResult is a decode step through a one-rank NCCL communicator
// (TensorAllReducer of world size 1 in every layer, as a tensor-parallel
// rank runs) beside the plain path, the two timed in alternation.
type OneRankResult struct {
	PlainEagerSeconds float64 `json:"plain_eager_step_s"`
	EagerSeconds      float64 `json:"eager_step_s"`
	PlainGraphSeconds float64 `json:"plain_graph_step_s,omitempty"`
	GraphSeconds      float64 `json:"graph_step_s,omitempty"`
	// StepSeconds and PlainStepSeconds are the graph replays' when
	// --cuda-graph, else the eager steps'.
	StepSeconds      float64 `json:"step_s"`
	PlainStepSeconds float64 `json:"plain_step_s"`
	Overhead         float64 `json:"overhead"` // step_s / plain_step_s − 1
	WithinBudget     bool    `json:"within_budget"`
	// CollectiveSeconds is the time the communicator adds (with − without,
	// at least 0); CollectiveShare its share of the step.
	CollectiveSeconds float64 `json:"collective_s"`
	CollectiveShare   float64 `json:"collective_share"`
}

func addTPFlags(fs *flag.FlagSet, o *Options) {
	fs.IntVar(&o.TP, "tensor-parallel-size", 0, "also report the decode floor on N GPUs of a tensor-parallel stage; 1: also time the steps through a one-rank NCCL communicator against the plain path (N > 1 is predicted, not timed)")
	fs.BoolVar(&o.ExpertParallel, "enable-expert-parallel", false, "with --tensor-parallel-size: place routed experts whole on the N GPUs (contiguous blocks) instead of splitting each N ways")
	fs.StringVar(&o.CollectiveJSON, "collective-json", "", "all-reduce times from `glmtopo bench collective --ranks N --json` for the floor (default: the catalog's NVLink rate for this GPU)")
	fs.BoolVar(&o.FloorOnly, "floor-only", false, "print the floor of --tensor-parallel-size N (default 1) without building or timing anything; without a GPU the rates come from the catalog (--gpu)")
	fs.StringVar(&o.GPU, "gpu", "", "catalog GPU model for rates not measured (default: this device; H200 without one)")
}

// checkTP validates the tensor-parallel flags against the model's shapes.
func (o *Options) checkTP() error {
	switch {
	case o.TP < 0:
		return fmt.Errorf("bench step: --tensor-parallel-size %d: want 1 or more", o.TP)
	case o.ExpertParallel && o.TP < 1:
		return errors.New("bench step: --enable-expert-parallel needs --tensor-parallel-size N")
	case o.CollectiveJSON != "" && o.TP < 2:
		return fmt.Errorf("bench step: --collective-json: a stage of --tensor-parallel-size %d runs no collective (want 2 or more)", o.TP)
	case o.FloorOnly && (o.SpecTokens > 0 || o.CalibrationOut != "" || o.Profile):
		return errors.New("bench step: --floor-only times nothing: drop --speculative-tokens, --calibration-out and --profile")
	}
	if o.FloorOnly && o.TP == 0 {
		o.TP = 1
	}
	if o.TP == 0 {
		return nil
	}
	cfg, err := loadConfig(o.Model, o.Layers)
	if err != nil {
		return err
	}
	if _, err := shard(cfg, o.TP, o.ExpertParallel); err != nil {
		return fmt.Errorf("bench step: %w", err)
	}
	if o.CollectiveJSON != "" {
		if _, err := loadAllReduce(o.CollectiveJSON, o.TP); err != nil {
			return fmt.Errorf("bench step: %w", err)
		}
	}
	return nil
}

// gpuSpec is the catalog entry for --gpu, else for the device, else H200.
func gpuSpec(flagGPU, device string, mem uint64) (topology.GPUSpec, error) {
	name := flagGPU
	if name == "" && device != "" {
		var err error
		if name, err = topology.GPUFromDeviceName(device, mem); err != nil {
			return topology.GPUSpec{}, fmt.Errorf("%w: name one with --gpu, or measure the all-reduce with --collective-json", err)
		}
	}
	if name == "" {
		name = "H200"
	}
	return topology.LookupGPU(name)
}

// newTPReport sets up the floor's rates: readBW measured (0: the catalog's).
func newTPReport(o Options, device string, mem uint64, readBW float64) (*TPReport, allReduceRate, error) {
	spec, err := gpuSpec(o.GPU, device, mem)
	// An unknown device matters only where a catalog rate stands in for a
	// measured one; an unknown --gpu always does.
	if err != nil && (o.GPU != "" || readBW <= 0 || (o.TP > 1 && o.CollectiveJSON == "")) {
		return nil, nil, fmt.Errorf("bench step: %w", err)
	}
	tp := &TPReport{Size: o.TP, ExpertParallel: o.ExpertParallel, GPU: spec.Name, ReadBW: readBW, ReadBWSource: "measured on " + device}
	if readBW <= 0 {
		tp.ReadBW = spec.HBMGBps * 1e9 * spec.Efficiency.HBM
		tp.ReadBWSource = fmt.Sprintf("catalog (%s %.0f GB/s × %.2f)", spec.Name, spec.HBMGBps, spec.Efficiency.HBM)
	}
	if o.TP < 2 {
		return tp, nil, nil
	}
	var ar allReduceRate
	if o.CollectiveJSON == "" {
		ar = newCatalogAllReduce(spec, o.TP)
	} else if ar, err = loadAllReduce(o.CollectiveJSON, o.TP); err != nil {
		return nil, nil, fmt.Errorf("bench step: %w", err)
	}
	tp.AllReduceRate = ar.Source()
	return tp, ar, nil
}

// tensorParallel adds the floor on --tensor-parallel-size GPUs of every
// decode batch the bench timed (routed experts as this run routed them),
// with the one-rank communicator's measurements when N is 1.
func (b *bench) tensorParallel(rep *Report, log io.Writer) error {
	o := b.o
	tp, ar := b.tp, b.ar
	if tp == nil {
		return nil
	}
	tp.Timed = o.TP == 1
	if o.TP > 1 {
		tp.Note = fmt.Sprintf("timing a step on %d GPUs needs %d GPUs and the multi-GPU stage: floor predicted from this GPU's HBM rate and this run's routing", o.TP, o.TP)
		fmt.Fprintf(log, "bench step: %s\n", tp.Note)
	}
	for _, r := range rep.Results {
		if r.Phase != "decode" {
			continue
		}
		f, err := rankFloor(b.cfg, floorSpec{gpus: o.TP, ep: o.ExpertParallel, batch: r.Batch, context: r.Context,
			kvElem: b.kvElem, routes: r.routes, readBW: tp.ReadBW, ar: ar})
		if err != nil {
			return fmt.Errorf("bench step: %w", err)
		}
		if x := r.OneRank; x != nil {
			f.Measured = &RankStep{StepSeconds: x.StepSeconds, CollectiveSeconds: x.CollectiveSeconds,
				CollectiveShare: x.CollectiveShare, Efficiency: f.FloorSeconds / x.StepSeconds}
		}
		tp.Floors = append(tp.Floors, f)
	}
	rep.TensorParallel = tp
	return nil
}

// runFloorOnly is --floor-only: the floor of each --batch on N GPUs from
// the config alone (uniform routing), at this GPU's measured HBM rate when
// there is one, else the catalog's.
func runFloorOnly(ctx context.Context, o Options, log io.Writer) (*Report, error) {
	cfg, err := loadConfig(o.Model, o.Layers)
	if err != nil {
		return nil, err
	}
	dt, err := kernels.ParseKVCacheDType(o.KVDType, kernels.BF16)
	if err != nil {
		return nil, err
	}
	rep := &Report{Model: o.Model, Layers: cfg.NumHiddenLayers, Dense: cfg.FirstKDenseReplace, KVDType: o.KVDType}
	var device string
	var mem uint64
	be, err := cuda.New(cuda.Options{Device: o.Device})
	switch {
	case errors.Is(err, cuda.ErrNoCUDA):
		fmt.Fprintf(log, "bench step: no GPU (%v): rates from the catalog\n", err)
	case err != nil:
		return nil, err
	default:
		device, mem = be.DeviceName(), uint64(be.MemoryBytes())
		fmt.Fprintf(log, "bench step: measuring HBM read bandwidth on %s\n", device)
		rep.ReadBW, err = be.ReadBandwidth(4<<30, 10)
		be.Close()
		if err != nil {
			return nil, fmt.Errorf("read bandwidth: %w", err)
		}
	}
	tp, ar, err := newTPReport(o, device, mem, rep.ReadBW)
	if err != nil {
		return nil, err
	}
	rep.Device = device
	if device == "" {
		rep.Device = tp.GPU + " (catalog)"
	}
	tp.Note = "--floor-only: nothing timed; routed experts under uniform routing"
	for _, B := range o.Batches {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		f, err := rankFloor(cfg, floorSpec{gpus: o.TP, ep: o.ExpertParallel, batch: B, context: o.Context,
			kvElem: dt.Size(), readBW: tp.ReadBW, ar: ar})
		if err != nil {
			return nil, fmt.Errorf("bench step: %w", err)
		}
		tp.Floors = append(tp.Floors, f)
	}
	rep.TensorParallel = tp
	return rep, nil
}

// oneRank times decode steps of bt through a one-rank NCCL communicator
// and the plain path in alternating rounds (eagerly, and replaying a graph
// of each with --cuda-graph), so that drift in clocks or temperature
// falls on both alike.
func (b *bench) oneRank(bt *kernels.Batch, rows []int, warmup, iters int) (*OneRankResult, error) {
	ar := nccl.NewTensorAllReducer(nil, b.be) // world size 1: no libnccl needed
	rc := &model.RankComm{TP: ar, MoE: ar, SharedExpert: true}
	rounds := max(iters, minOneRankRounds)
	defer func() { b.ranks = nil }()
	eager, err := b.alternate(warmup, rounds, []*model.RankComm{nil, rc}, func(int) (float64, error) {
		dev, _, err := b.timeSteps(bt, rows, 0, 1)
		return dev, err
	})
	if err != nil {
		return nil, err
	}
	x := &OneRankResult{PlainEagerSeconds: eager[0], EagerSeconds: eager[1], PlainStepSeconds: eager[0], StepSeconds: eager[1]}
	if b.o.Graph {
		graphs, done, err := b.captureDecode(bt, 2, nil, rc)
		if err != nil {
			return nil, fmt.Errorf("cuda graph: %w", err)
		}
		defer done()
		tm, err := b.be.NewTimer()
		if err != nil {
			return nil, err
		}
		defer tm.Close()
		g, err := b.alternate(2, rounds, nil, func(i int) (float64, error) { return tm.Median(0, 1, graphs[i].Launch) })
		if err != nil {
			return nil, err
		}
		if err := b.be.Sync(); err != nil {
			return nil, err
		}
		x.PlainGraphSeconds, x.GraphSeconds, x.PlainStepSeconds, x.StepSeconds = g[0], g[1], g[0], g[1]
	}
	x.Overhead = x.StepSeconds/x.PlainStepSeconds - 1
	x.WithinBudget = x.Overhead <= OneRankBudget
	x.CollectiveSeconds = max(0, x.StepSeconds-x.PlainStepSeconds)
	x.CollectiveShare = x.CollectiveSeconds / x.StepSeconds
	return x, nil
}

// alternate runs time(0) and time(1) in turn, warmup+rounds times each
// (with b.ranks set to comms[i] when comms is given), and returns the
// median of each over the last rounds.
func (b *bench) alternate(warmup, rounds int, comms []*model.RankComm, time func(i int) (float64, error)) ([2]float64, error) {
	var got [2][]float64
	for r := range warmup + rounds {
		for i := range 2 {
			if comms != nil {
				b.ranks = comms[i]
			}
			s, err := time(i)
			if err != nil {
				return [2]float64{}, err
			}
			if r >= warmup {
				got[i] = append(got[i], s)
			}
		}
	}
	return [2]float64{median(got[0]), median(got[1])}, nil
}

func printTPTable(w io.Writer, r *Report) {
	tp := r.TensorParallel
	if tp == nil {
		return
	}
	ep := "routed experts split"
	if tp.ExpertParallel {
		ep = "expert parallel (whole experts, contiguous blocks)"
	}
	fmt.Fprintf(w, "\ntensor parallel %d, %s: decode floor per GPU | HBM read %.0f GB/s, %s\n", tp.Size, ep, tp.ReadBW/1e9, tp.ReadBWSource)
	if tp.AllReduceRate != "" {
		fmt.Fprintf(w, "all-reduce: %s\n", tp.AllReduceRate)
	}
	fmt.Fprintf(w, "%6s %8s %9s %11s %9s %6s %9s %9s %9s %7s %8s\n", "batch", "context", "GB/GPU", "experts/GPU",
		"HBM ms", "ARs", "coll ms", "floor ms", "step ms", "coll %", "% floor")
	for _, f := range tp.Floors {
		fmt.Fprintf(w, "%6d %8d %9.3f %11.1f %9.3f %6d %9.3f %9.3f", f.Batch, f.Context, float64(f.BytesPerGPU)/1e9,
			f.ExpertsPerGPU, f.HBMSeconds*1e3, f.AllReduces, f.CollectiveSeconds*1e3, f.FloorSeconds*1e3)
		if m := f.Measured; m != nil {
			fmt.Fprintf(w, " %9.3f %6.1f%% %7.1f%%", m.StepSeconds*1e3, 100*m.CollectiveShare, 100*m.Efficiency)
		} else {
			fmt.Fprintf(w, " %9s %7s %8s", "-", "-", "-")
		}
		fmt.Fprintln(w)
	}
	if tp.Note != "" {
		fmt.Fprintf(w, "note: %s\n", tp.Note)
	}
	printOneRankTable(w, r)
}

func printOneRankTable(w io.Writer, r *Report) {
	header := false
	for _, x := range r.Results {
		o := x.OneRank
		if o == nil {
			continue
		}
		if !header {
			fmt.Fprintf(w, "\none-rank NCCL communicator against the plain path (same run, alternating; budget %.0f%%)\n", 100*OneRankBudget)
			fmt.Fprintf(w, "%6s %14s %14s %14s %14s %9s %7s\n", "batch", "plain eager ms", "1-rank eager", "plain graph ms", "1-rank graph", "overhead", "budget")
			header = true
		}
		verdict := "ok"
		if !o.WithinBudget {
			verdict = "OVER"
		}
		fmt.Fprintf(w, "%6d %14.3f %14.3f %14.3f %14.3f %+8.2f%% %7s\n", x.Batch, o.PlainEagerSeconds*1e3, o.EagerSeconds*1e3,
			o.PlainGraphSeconds*1e3, o.GraphSeconds*1e3, 100*o.Overhead, verdict)
	}
}

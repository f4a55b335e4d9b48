package topology

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"os"

	"go.yaml.in/yaml/v3"

	"github.com/glmtopo/glmtopo/model"
)

// CPUSpec is a host without GPUs as the CPU backend (kernels/cpu) uses it:
// the rates and fixed costs its kernels reach on this machine, measured by
// MeasureCPU (`glmtopo plan --calibrate-cpu`), since no datasheet says what
// pure-Go kernels get out of a core. Rates come twice: with every core (what
// one stage alone gets) and with one worker (what a core gives when stages
// of several processes share the machine).
type CPUSpec struct {
	Cores int `yaml:"cores" json:"cores"`
	// GEMM: Linear with more than two rows converts each weight chunk from
	// bf16 once (ConvGElems, 1e9 weights per second), then multiplies.
	GEMMGFLOPS     float64 `yaml:"gemm_gflops" json:"gemm_gflops"`
	GEMMCoreGFLOPS float64 `yaml:"gemm_core_gflops" json:"gemm_core_gflops"`
	ConvGElems     float64 `yaml:"conv_gelems" json:"conv_gelems"`
	ConvCoreGElems float64 `yaml:"conv_core_gelems" json:"conv_core_gelems"`
	// GEMV: Linear with one or two rows streams the bf16 weights (GB/s).
	GEMVGBps     float64 `yaml:"gemv_gbps" json:"gemv_gbps"`
	GEMVCoreGBps float64 `yaml:"gemv_core_gbps" json:"gemv_core_gbps"`
	// Attention over the paged cache (QKᵀ and PV FLOPs).
	AttnGFLOPS     float64 `yaml:"attn_gflops" json:"attn_gflops"`
	AttnCoreGFLOPS float64 `yaml:"attn_core_gflops" json:"attn_core_gflops"`
	// ParallelCores is how many cores the workers effectively get: the
	// speed-up of a GEMM on every worker over one, measured in alternation
	// so that other jobs' load changes cancel (between 1 and Cores).
	ParallelCores float64 `yaml:"parallel_cores" json:"parallel_cores"`
	// OpOverheadUS is one kernel call that fans out to the workers
	// (goroutines started and joined): what small layers pay per op.
	OpOverheadUS float64 `yaml:"op_overhead_us" json:"op_overhead_us"`
	// LayerWorkFactor scales the kernels' modelled work inside a layer: the
	// rates above are each kernel alone in a tight loop; a layer's kernels
	// run colder (measured on real layers; 1 keeps the rates as they are).
	LayerWorkFactor float64 `yaml:"layer_work_factor" json:"layer_work_factor"`
	// ElemNS is one element of a single-threaded elementwise op (norms,
	// residual adds, SiLU, rope, expert gather/scatter).
	ElemNS float64 `yaml:"elem_ns" json:"elem_ns"`
	// SampleNS is one logit of one row through the sampler.
	SampleNS float64 `yaml:"sample_ns" json:"sample_ns"`
	// StepOverheadUS is an engine step's fixed cost outside the kernels:
	// goroutine hand-offs between the scheduler, the HTTP handlers and the
	// engine (a channel round trip, measured, times the hand-offs a step makes).
	StepOverheadUS float64 `yaml:"step_overhead_us" json:"step_overhead_us"`
	// HopLatencyUS and HopGBps are one message over TCP on loopback, one
	// way, between two goroutines of one process.
	HopLatencyUS float64 `yaml:"hop_latency_us" json:"hop_latency_us"`
	HopGBps      float64 `yaml:"hop_gbps" json:"hop_gbps"`
	// WakeUS is a sleeping process woken by a message: half a round trip
	// through a pipe to a child process, each sent after an idle pause. A
	// pipeline hop wakes three sleeping threads (the receiving stage reads,
	// runs and writes on three goroutines), an engine step one, and a
	// streamed token two on the head's machine (its HTTP handler and the
	// client reading the stream).
	WakeUS float64 `yaml:"wake_us" json:"wake_us"`
	// Load is the 1-minute load average when measured (other jobs slow it).
	Load float64 `yaml:"load,omitempty" json:"load,omitempty"`
}

// Validate checks that every rate is positive and every cost plausible.
func (c CPUSpec) Validate() error {
	if c.Cores < 1 || c.Cores > 4096 {
		return fmt.Errorf("cpu spec: cores %d is outside 1..4096", c.Cores)
	}
	for _, f := range []struct {
		name string
		v    float64
	}{{"gemm_gflops", c.GEMMGFLOPS}, {"gemm_core_gflops", c.GEMMCoreGFLOPS}, {"conv_gelems", c.ConvGElems},
		{"conv_core_gelems", c.ConvCoreGElems}, {"gemv_gbps", c.GEMVGBps}, {"gemv_core_gbps", c.GEMVCoreGBps},
		{"attn_gflops", c.AttnGFLOPS}, {"attn_core_gflops", c.AttnCoreGFLOPS}, {"hop_gbps", c.HopGBps},
		{"layer_work_factor", c.LayerWorkFactor}} {
		if !(f.v > 0 && f.v < 1e6) {
			return fmt.Errorf("cpu spec: %s = %g is not a positive rate", f.name, f.v)
		}
	}
	for _, f := range []struct {
		name string
		v    float64
	}{{"op_overhead_us", c.OpOverheadUS}, {"elem_ns", c.ElemNS}, {"sample_ns", c.SampleNS},
		{"step_overhead_us", c.StepOverheadUS}, {"hop_latency_us", c.HopLatencyUS}, {"wake_us", c.WakeUS},
		{"parallel_cores", c.ParallelCores}} {
		if !(f.v >= 0 && f.v < 1e6) {
			return fmt.Errorf("cpu spec: %s = %g is outside [0, 1e6)", f.name, f.v)
		}
	}
	return nil
}

// ParseCPUSpec reads a CPU calibration (YAML or JSON) strictly.
func ParseCPUSpec(data []byte) (CPUSpec, error) {
	var c CPUSpec
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil {
		if errors.Is(err, io.EOF) {
			return c, errors.New("cpu calibration: empty document")
		}
		return c, fmt.Errorf("cpu calibration: %w", err)
	}
	return c, c.Validate()
}

// LoadCPUSpec reads a CPU calibration file.
func LoadCPUSpec(path string) (CPUSpec, error) {
	return loadFile(path, "cpu calibration", ParseCPUSpec)
}

// WriteFile writes the calibration as YAML.
func (c CPUSpec) WriteFile(path string) error {
	data, err := yaml.Marshal(c)
	if err != nil {
		return fmt.Errorf("write cpu calibration: %w", err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		return fmt.Errorf("write cpu calibration: %w", err)
	}
	return nil
}

// parallelCores is how many cores the kernels' workers effectively get
// (other jobs on the machine take the rest), between 1 and Cores; without
// a paired measurement, the ratio of the GEMM rates.
func (c CPUSpec) parallelCores() float64 {
	p := c.ParallelCores
	if p == 0 {
		p = c.GEMMGFLOPS / c.GEMMCoreGFLOPS
	}
	return min(float64(c.Cores), max(1, p))
}

// cpuWork is a piece of work on a CPU host: alone is its wall time with
// every core free, core the core-seconds it occupies. Stages of several
// processes on one machine share its cores, so a pipeline's cycle is bounded
// by their summed core time over the cores as well as by the slowest stage.
type cpuWork struct{ alone, core float64 }

func (w *cpuWork) add(o cpuWork) {
	w.alone += o.alone
	w.core += o.core
}

func (w cpuWork) scale(k float64) cpuWork { return cpuWork{w.alone * k, w.core * k} }

// fanOut is a kernel that splits its rows over the workers: the goroutines'
// start and join, then work that scales with the cores.
func (c CPUSpec) fanOut(allCores, oneCore float64) cpuWork {
	o := c.OpOverheadUS * 1e-6
	return cpuWork{alone: o + allCores*c.LayerWorkFactor, core: o + oneCore*c.LayerWorkFactor}
}

// serial is single-threaded work of n elements.
func (c CPUSpec) serial(n float64) cpuWork {
	t := n * c.ElemNS * 1e-9 * c.LayerWorkFactor
	return cpuWork{t, t}
}

// linear is out[T,N] = x[T,K]·Wᵀ with bf16 W, as kernels/cpu runs it: up to
// two rows stream the weights (GEMV); more convert them to f32 once per call
// and multiply in register tiles.
func (c CPUSpec) linear(T, K, N float64) cpuWork {
	if T <= 0 {
		return cpuWork{}
	}
	if T <= 2 {
		b := 2 * K * N
		return c.fanOut(b/(c.GEMVGBps*1e9), b/(c.GEMVCoreGBps*1e9))
	}
	f := 2 * T * K * N
	return c.fanOut(K*N/(c.ConvGElems*1e9)+f/(c.GEMMGFLOPS*1e9), K*N/(c.ConvCoreGElems*1e9)+f/(c.GEMMCoreGFLOPS*1e9))
}

// attention is QKᵀ and PV for query tokens whose contexts sum to pairs.
func (c CPUSpec) attention(pairs float64, heads, headDim int) cpuWork {
	f := 4 * pairs * float64(heads*headDim)
	return c.fanOut(f/(c.AttnGFLOPS*1e9), f/(c.AttnCoreGFLOPS*1e9))
}

// sample is the sampler on rows rows of vocab logits (rows in parallel).
func (c CPUSpec) sample(rows, vocab float64) cpuWork {
	if rows <= 0 {
		return cpuWork{}
	}
	core := rows * vocab * c.SampleNS * 1e-9
	return cpuWork{alone: core / min(rows, float64(c.Cores)), core: core}
}

// Sleeping threads woken per pipeline hop, engine step and streamed token.
const (
	wakesPerHop   = 3
	wakesPerStep  = 1
	wakesPerToken = 2
)

// hop is one message of bytes from a stage to the next one's process: its
// wall time, and the core time of the threads it wakes.
func (c CPUSpec) hop(bytes float64) cpuWork {
	wake := wakesPerHop * c.WakeUS * 1e-6
	return cpuWork{alone: c.HopLatencyUS*1e-6 + wake + bytes/(c.HopGBps*1e9), core: wake}
}

// cpuTouched is the expected number of distinct experts T tokens route to,
// each choosing k of E uniformly: E·(1 − (1 − k/E)^T).
func cpuTouched(E, k int, T float64) float64 {
	if E <= 0 || T <= 0 {
		return 0
	}
	return float64(E) * (1 - math.Pow(1-float64(k)/float64(E), T))
}

// cpuBatch is what one stage sees of one micro-batch: T token rows from
// seqs sequences, attention over pairs (query, key) positions, and rows
// rows through lm_head and the sampler (the head stage only).
type cpuBatch struct {
	T, seqs, pairs, rows float64
}

// cpuLayer is decoder layer l (model.Forward's op sequence) on a micro-batch.
func cpuLayer(c CPUSpec, cfg *model.Config, l int, b cpuBatch) cpuWork {
	H := float64(cfg.HiddenSize)
	T := b.T
	var w cpuWork
	w.add(c.serial(3 * T * H)) // input norm, post-attention add+norm, residual add
	q, kv := float64(cfg.QDim()), float64(cfg.KVDim())
	w.add(c.linear(T, H, q))
	w.add(c.linear(T, H, kv))
	w.add(c.linear(T, H, kv))
	w.add(c.serial(T * (q + 2*kv))) // qk-norm, rope, KV write
	w.add(c.attention(b.pairs, cfg.NumAttentionHeads, cfg.HeadDim))
	w.add(c.linear(T, q, H))
	if l < cfg.FirstKDenseReplace || cfg.NRoutedExperts == 0 {
		I := float64(cfg.IntermediateSize)
		w.add(c.linear(T, H, I))
		w.add(c.linear(T, H, I))
		w.add(c.serial(T * I))
		w.add(c.linear(T, I, H))
		return w
	}
	E, k := cfg.NRoutedExperts, cfg.NumExpertsPerTok
	I := float64(cfg.MoEIntermediateSize)
	w.add(c.linear(T, H, float64(E)))
	w.add(c.serial(T * float64(E) * 4)) // sigmoid, bias, top-k
	// Each touched expert runs gate, up and down on its rows: per-call
	// overheads and weight conversion count per expert, FLOPs per routed row.
	n := cpuTouched(E, k, T)
	rows := T * float64(k) / max(n, 1)
	e := c.linear(rows, H, I)
	e.add(c.linear(rows, H, I))
	e.add(c.linear(rows, I, H))
	w.add(e.scale(n))
	w.add(c.serial(T * float64(k) * (2*H + I))) // gather, SiLU·up, weighted scatter
	if s := float64(cfg.NSharedExperts); s > 0 {
		w.add(c.linear(T, H, I*s))
		w.add(c.linear(T, H, I*s))
		w.add(c.serial(T*I*s + T*H))
		w.add(c.linear(T, I*s, H))
	}
	return w
}

// cpuStage is stage s's work on one micro-batch: layers [first, end), and on
// the head the embedding, final norm, lm_head and sampler; every stage pays
// the step's fixed cost.
func cpuStage(c CPUSpec, cfg *model.Config, first, end int, head bool, b cpuBatch) cpuWork {
	w := cpuFront(c, cfg, first, end, head, b)
	if head {
		w.add(cpuBack(c, cfg, b))
	}
	return w
}

// cpuFront is a stage's work before its rows leave: the step's fixed cost,
// the embedding on the head, and its layers.
func cpuFront(c CPUSpec, cfg *model.Config, first, end int, head bool, b cpuBatch) cpuWork {
	fixed := (c.StepOverheadUS + wakesPerStep*c.WakeUS) * 1e-6
	w := cpuWork{fixed, fixed}
	if head {
		w.add(c.serial(b.T * float64(cfg.HiddenSize))) // embedding rows
	}
	for l := first; l < end; l++ {
		w.add(cpuLayer(c, cfg, l, b))
	}
	return w
}

// cpuBack is the head's work when a micro-batch's rows come back: final
// norm, lm_head and the sampler, and each sampled token streamed (its HTTP
// handler and the client wake beside the step: core time only).
func cpuBack(c CPUSpec, cfg *model.Config, b cpuBatch) cpuWork {
	H := float64(cfg.HiddenSize)
	w := c.serial(b.rows * H)
	w.add(c.linear(b.rows, H, float64(cfg.VocabSize)))
	w.add(c.sample(b.rows, float64(cfg.VocabSize)))
	w.core += b.rows * wakesPerToken * c.WakeUS * 1e-6
	return w
}

package topology

import (
	"context"
	"errors"
	"fmt"
	"math"
	"runtime"
	"sort"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
)

// MeasureCPU measures this machine's CPU backend (about ten seconds): the
// kernels/cpu Linear at GEMV and GEMM shapes with every core and with one
// worker, paged attention, real decoder layers (cpuprobe.go), an elementwise
// op, the sampler, thread wake-ups and a message over TCP on loopback. Each
// figure is the median of several short runs: where other jobs share the
// machine it is what the engine gets while they run (Load records the load
// average), so calibrate right before what is to be predicted.
func MeasureCPU(ctx context.Context) (CPUSpec, error) {
	// Three rounds, each figure their median: a burst of other jobs during
	// one round moves no figure.
	var rounds []CPUSpec
	for range 3 {
		s, err := measureOnce(ctx)
		if err != nil {
			return s, err
		}
		rounds = append(rounds, s)
	}
	spec := medianSpec(rounds)
	return spec, spec.Validate()
}

// medianSpec is each figure's median over rounds (len ≥ 1).
func medianSpec(rounds []CPUSpec) CPUSpec {
	out := rounds[0]
	for _, f := range []func(*CPUSpec) *float64{
		func(c *CPUSpec) *float64 { return &c.GEMMGFLOPS }, func(c *CPUSpec) *float64 { return &c.GEMMCoreGFLOPS },
		func(c *CPUSpec) *float64 { return &c.ConvGElems }, func(c *CPUSpec) *float64 { return &c.ConvCoreGElems },
		func(c *CPUSpec) *float64 { return &c.GEMVGBps }, func(c *CPUSpec) *float64 { return &c.GEMVCoreGBps },
		func(c *CPUSpec) *float64 { return &c.AttnGFLOPS }, func(c *CPUSpec) *float64 { return &c.AttnCoreGFLOPS },
		func(c *CPUSpec) *float64 { return &c.ParallelCores }, func(c *CPUSpec) *float64 { return &c.OpOverheadUS },
		func(c *CPUSpec) *float64 { return &c.LayerWorkFactor }, func(c *CPUSpec) *float64 { return &c.ElemNS },
		func(c *CPUSpec) *float64 { return &c.SampleNS }, func(c *CPUSpec) *float64 { return &c.StepOverheadUS },
		func(c *CPUSpec) *float64 { return &c.HopLatencyUS }, func(c *CPUSpec) *float64 { return &c.HopGBps },
		func(c *CPUSpec) *float64 { return &c.WakeUS }, func(c *CPUSpec) *float64 { return &c.Load },
	} {
		vs := make([]float64, len(rounds))
		for i := range rounds {
			vs[i] = *f(&rounds[i])
		}
		sort.Float64s(vs)
		*f(&out) = vs[len(vs)/2]
	}
	return out
}

// measureOnce is one round of every measurement.
func measureOnce(ctx context.Context) (CPUSpec, error) {
	spec := CPUSpec{Cores: runtime.GOMAXPROCS(0), Load: loadAverage()}
	all, one := cpu.New(spec.Cores), cpu.New(1)
	var err error
	step := func(f func() error) {
		if err == nil {
			if err = ctx.Err(); err == nil {
				err = f()
			}
		}
	}
	step(func() error {
		// A 64-row output split into 8 chunks starts the workers; its work is ~2 µs of 8 µs.
		t, e := timeLinear(all, 1, 8, 64)
		spec.OpOverheadUS = t * 1e6
		return e
	})
	o := spec.OpOverheadUS * 1e-6
	for _, m := range []struct {
		be        *cpu.Backend
		gemv      *float64
		conv, mul *float64
		attn      *float64
	}{{all, &spec.GEMVGBps, &spec.ConvGElems, &spec.GEMMGFLOPS, &spec.AttnGFLOPS},
		{one, &spec.GEMVCoreGBps, &spec.ConvCoreGElems, &spec.GEMMCoreGFLOPS, &spec.AttnCoreGFLOPS}} {
		step(func() error {
			const K, N = 512, 512
			t, e := timeLinear(m.be, 1, K, N)
			*m.gemv = 2 * K * N / math.Max(t-o, 1e-9) / 1e9
			return e
		})
		step(func() error {
			conv, mul, e := fitGEMM(m.be, o)
			*m.conv, *m.mul = conv, mul
			return e
		})
		step(func() error {
			f, t, e := timeAttention(m.be)
			*m.attn = f / math.Max(t-o, 1e-9) / 1e9
			return e
		})
	}
	step(func() error {
		p, e := pairedSpeedup(all, one)
		spec.ParallelCores = min(float64(spec.Cores), max(1, p))
		return e
	})
	step(func() error {
		o, eff, e := probeLayers(spec, all) // cpuprobe.go
		spec.OpOverheadUS, spec.LayerWorkFactor = o, eff
		return e
	})
	step(func() error {
		const T, H = 64, 1024
		t, e := timeRMSNorm(all, T, H)
		spec.ElemNS = t / (T * H) * 1e9
		return e
	})
	step(func() error {
		const V = 16384
		t, e := timeSample(all, V)
		spec.SampleNS = t / V * 1e9
		return e
	})
	step(func() error {
		// The scheduler hands the step's tokens to the request goroutines
		// and takes the next requests: two hand-offs between running threads.
		t, e := timeHandoff()
		spec.StepOverheadUS = 2 * t * 1e6
		return e
	})
	step(func() error {
		w, e := timeWake(ctx)
		spec.WakeUS = w * 1e6
		return e
	})
	step(func() error {
		lat, bw, e := timeLoopback(ctx)
		spec.HopLatencyUS, spec.HopGBps = lat*1e6, bw/1e9
		return e
	})
	if err != nil {
		return spec, fmt.Errorf("measure cpu: %w", err)
	}
	return spec, spec.Validate()
}

// pairedSpeedup is the median, over 31 pairs run back to back, of a GEMM's
// time on one worker over its time on every worker: pairs a few
// milliseconds apart see the same background load, which a ratio of two
// separate measurements would not.
func pairedSpeedup(all, one *cpu.Backend) (float64, error) {
	const T, K, N = 128, 256, 256
	run := func(be *cpu.Backend) (func() (float64, error), error) {
		w, err := filled(be, kernels.BF16, N, K)
		if err != nil {
			return nil, err
		}
		x, err := filled(be, kernels.F32, T, K)
		if err != nil {
			return nil, err
		}
		out, err := be.NewTensor(kernels.F32, T, N)
		if err != nil {
			return nil, err
		}
		return func() (float64, error) {
			start := time.Now()
			for i := 0; i < 4; i++ {
				if err := be.Linear(out, x, w, nil); err != nil {
					return 0, err
				}
			}
			return time.Since(start).Seconds(), nil
		}, nil
	}
	a, err := run(all)
	if err != nil {
		return 0, err
	}
	b, err := run(one)
	if err != nil {
		return 0, err
	}
	ratios := make([]float64, 31)
	for i := range ratios {
		ta, err := a()
		if err != nil {
			return 0, err
		}
		tb, err := b()
		if err != nil {
			return 0, err
		}
		ratios[i] = tb / ta
	}
	sort.Float64s(ratios)
	return ratios[len(ratios)/2], nil
}

// fitGEMM separates a GEMM Linear's per-call weight conversion from its
// FLOPs: t − o = K·N/conv + 2·T·K·N/mul over row counts from 3 (conversion
// dominates) to 256 (FLOPs dominate), least squares in relative error.
// It returns the rates in 1e9 weights/s and GFLOP/s.
func fitGEMM(be *cpu.Backend, o float64) (conv, mul float64, err error) {
	const K, N = 256, 256
	var a11, a12, a22, b1, b2 float64
	for _, T := range []int{3, 8, 32, 128, 256} {
		t, err := timeLinear(be, T, K, N)
		if err != nil {
			return 0, 0, err
		}
		t = math.Max(t-o, 1e-9)
		x1, x2 := K*N/t, 2*float64(T)*K*N/t // unknowns: 1/conv, 1/mul (s per unit)
		a11, a12, a22 = a11+x1*x1, a12+x1*x2, a22+x2*x2
		b1, b2 = b1+x1, b2+x2
	}
	det := a11*a22 - a12*a12
	if det <= 0 {
		return 0, 0, errors.New("gemm fit: degenerate")
	}
	perConv := (b1*a22 - b2*a12) / det
	perFLOP := (a11*b2 - a12*b1) / det
	switch { // noise can push one figure below zero: refit the other alone
	case perConv <= 0:
		perConv, perFLOP = 1e-12, b2/a22
	case perFLOP <= 0:
		perConv, perFLOP = b1/a11, 1e-15
	}
	return 1 / perConv / 1e9, 1 / perFLOP / 1e9, nil
}

// timeOp is the median mean time of f over seven runs of about 10 ms
// each: on a machine other jobs share, what a kernel typically gets now,
// which is what the engine's kernels will get (the best run would be an
// idle machine's).
func timeOp(f func() error) (float64, error) {
	if err := f(); err != nil { // warm caches and allocations
		return 0, err
	}
	n := 1
	for {
		start := time.Now()
		for i := 0; i < n; i++ {
			if err := f(); err != nil {
				return 0, err
			}
		}
		if d := time.Since(start); d > 2*time.Millisecond || n >= 1<<20 {
			n = max(1, int(float64(n)*float64(10*time.Millisecond)/float64(d)))
			break
		}
		n *= 4
	}
	runs := make([]float64, 7)
	for r := range runs {
		start := time.Now()
		for i := 0; i < n; i++ {
			if err := f(); err != nil {
				return 0, err
			}
		}
		runs[r] = time.Since(start).Seconds() / float64(n)
	}
	sort.Float64s(runs)
	return runs[len(runs)/2], nil
}

func filled(be *cpu.Backend, dt kernels.DType, shape ...int) (*kernels.Tensor, error) {
	t, err := be.NewTensor(dt, shape...)
	if err != nil {
		return nil, err
	}
	if dt == kernels.F32 || dt == kernels.BF16 {
		err = be.Fill(t, 1, 0.05)
	}
	return t, err
}

// timeLinear times out[T,N] = x[T,K]·Wᵀ with bf16 W, as the model's weights are.
func timeLinear(be *cpu.Backend, T, K, N int) (float64, error) {
	w, err := filled(be, kernels.BF16, N, K)
	if err != nil {
		return 0, err
	}
	x, err := filled(be, kernels.F32, T, K)
	if err != nil {
		return 0, err
	}
	out, err := be.NewTensor(kernels.F32, T, N)
	if err != nil {
		return 0, err
	}
	return timeOp(func() error { return be.Linear(out, x, w, nil) })
}

// timeAttention times decode attention of 16 sequences at context 256
// (8 heads over 2 KV heads of 64) and returns its FLOPs and time.
func timeAttention(be *cpu.Backend) (flops, secs float64, err error) {
	const seqs, ctx, H, KVH, D, bs = 16, 256, 8, 2, 64, 16
	blocks := ctx / bs
	k, err := filled(be, kernels.F32, seqs*ctx, KVH, D)
	if err != nil {
		return 0, 0, err
	}
	v, err := filled(be, kernels.F32, seqs*ctx, KVH, D)
	if err != nil {
		return 0, 0, err
	}
	var b kernels.Batch
	for s := 0; s < seqs; s++ {
		table := make([]int32, blocks)
		for i := range table {
			table[i] = int32(s*blocks + i)
		}
		b.Positions = append(b.Positions, ctx-1)
		b.SeqIndex = append(b.SeqIndex, int32(s))
		b.Slots = append(b.Slots, int32(s*ctx+ctx-1))
		b.BlockTables = append(b.BlockTables, table)
		b.ContextLens = append(b.ContextLens, ctx)
	}
	meta, err := be.UploadBatch(&b)
	if err != nil {
		return 0, 0, err
	}
	q, err := filled(be, kernels.F32, seqs, H*D)
	if err != nil {
		return 0, 0, err
	}
	out, err := be.NewTensor(kernels.F32, seqs, H*D)
	if err != nil {
		return 0, 0, err
	}
	cache := &kernels.KVCache{K: k, V: v, BlockSize: bs, KVHeads: KVH, HeadDim: D}
	p := kernels.AttentionParams{Heads: H, KVHeads: KVH, HeadDim: D, Scale: float32(1 / math.Sqrt(D))}
	secs, err = timeOp(func() error { return be.Attention(out, q, cache, p, meta) })
	return 4 * seqs * ctx * H * D, secs, err
}

// timeRMSNorm times a single-threaded RMSNorm of T rows of H.
func timeRMSNorm(be *cpu.Backend, T, H int) (float64, error) {
	x, err := filled(be, kernels.F32, T, H)
	if err != nil {
		return 0, err
	}
	out, err := be.NewTensor(kernels.F32, T, H)
	if err != nil {
		return 0, err
	}
	w, err := filled(be, kernels.F32, H)
	if err != nil {
		return 0, err
	}
	return timeOp(func() error { return be.RMSNorm(out, x, w, 1e-5) })
}

// timeSample times one row of V logits through the sampler (temperature 1).
func timeSample(be *cpu.Backend, V int) (float64, error) {
	logits, err := be.NewTensor(kernels.F32, 1, V)
	if err != nil {
		return 0, err
	}
	if err := be.Fill(logits, 3, 4); err != nil {
		return 0, err
	}
	params := []kernels.SampleParams{{Temperature: 1, U: 0.5}}
	return timeOp(func() error {
		_, err := be.Sample(logits, params)
		return err
	})
}

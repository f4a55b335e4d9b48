package model

import (
	"fmt"
	"math"
	"strings"

	"github.com/glmtopo/glmtopo/kernels"
)

// DummyWeights makes the selected tensors of c on be with generated values,
// as vLLM's --load-format dummy does: full-size shapes and dtypes (FP8 with
// its scales) without a checkpoint, for benchmarks and smoke tests. The
// backend fills the tensors where they live (kernels.Filler), so a GPU
// needs no host copy. Values are uniform and scaled by ~1/sqrt(fan-in), so
// activations stay finite through the layers; norms are ones. free releases
// every tensor made.
func DummyWeights(c *Config, sel Selection, be kernels.Backend, seed uint64) (w *Weights, free func(), err error) {
	fl, ok := be.(kernels.Filler)
	if !ok {
		return nil, nil, fmt.Errorf("dummy weights: backend %s cannot fill tensors", be.Name())
	}
	if p, ok := be.(kernels.WeightPacker); ok { // weights share pages (kernels/cuda/slab.go)
		p.PackWeights(true)
		defer p.PackWeights(false)
	}
	if sel.Shard != nil {
		if err := sel.Shard.Validate(c); err != nil {
			return nil, nil, fmt.Errorf("dummy weights: %w", err)
		}
	}
	d := &dummySource{c: c, be: be, fill: fl, seed: seed, shard: sel.Shard, specs: map[string]TensorSpec{}}
	for _, s := range c.Tensors() {
		d.specs[s.Name] = s
	}
	free = func() {
		for _, t := range d.made {
			be.Free(t)
		}
		d.made = nil
	}
	if w, err = Assemble(c, sel, d); err != nil {
		free()
		return nil, nil, fmt.Errorf("dummy weights: %w", err)
	}
	for _, t := range d.made {
		w.Bytes += int64(t.Elements() * t.DType.Size())
	}
	return w, free, nil
}

// dummySource is a TensorSource of generated tensors; each tensor's seed
// derives from the first seed and its name, so a model is a function of
// its config and first seed, and a pipeline stage's tensors (any
// Selection) are the very ones of the whole model.
type dummySource struct {
	c     *Config
	be    kernels.Backend
	fill  kernels.Filler
	seed  uint64
	shard *Shard // a rank's slices (shard.go); nil: whole tensors
	specs map[string]TensorSpec
	made  []*kernels.Tensor
}

// cut is spec s's shape on this rank and its fill seed. A slice's values
// are not the whole tensor's (the backend fills a tensor from one seed, as
// vLLM's dummy loader fills each rank's shard): they depend on the seed,
// the name and the slice, so ranks holding the same slice (replicated KV
// heads) agree, and uncut tensors equal the whole model's.
func (d *dummySource) cut(s TensorSpec) ([]int, uint64, error) {
	shape := make([]int, len(s.Shape))
	for i, x := range s.Shape {
		shape[i] = int(x)
	}
	sp, err := d.shard.SplitOf(d.c, s)
	if err != nil || sp.Whole() {
		return shape, d.seedOf(s.Name), err
	}
	return cutShape(shape, sp), d.seedOf(fmt.Sprintf("%s[%d:%d:%d]", s.Name, sp.Dim, sp.Start, sp.End)), nil
}

// seedOf is the seed of tensor name: FNV-1a of the name over the first seed.
func (d *dummySource) seedOf(name string) uint64 {
	h := 14695981039346656037 ^ d.seed*0x9e3779b97f4a7c15
	for i := 0; i < len(name); i++ {
		h = (h ^ uint64(name[i])) * 1099511628211
	}
	return h
}

func (d *dummySource) spec(name string) (TensorSpec, error) {
	s, ok := d.specs[name]
	if !ok {
		return s, fmt.Errorf("%s is not in the config's tensor list", name)
	}
	return s, nil
}

func (d *dummySource) tensor(dt kernels.DType, shape ...int) (*kernels.Tensor, error) {
	t, err := d.be.NewTensor(dt, shape...)
	if err != nil {
		return nil, err
	}
	d.made = append(d.made, t)
	return t, nil
}

// Tensor makes a plain tensor: norms are ones, biases small, tables random.
func (d *dummySource) Tensor(name string) (*kernels.Tensor, error) {
	s, err := d.spec(name)
	if err != nil {
		return nil, err
	}
	shape, seed, err := d.cut(s)
	if err != nil {
		return nil, err
	}
	if len(shape) == 1 { // norms, biases, correction bias: F32 on every backend
		t, err := d.tensor(kernels.F32, shape...)
		if err != nil {
			return nil, err
		}
		if strings.HasSuffix(name, "norm.weight") {
			return t, d.fill.FillConst(t, 1)
		}
		return t, d.fill.Fill(t, seed, 0.02)
	}
	t, err := d.tensor(kernels.BF16, shape...)
	if err != nil {
		return nil, err
	}
	return t, d.fill.Fill(t, seed, float32(math.Sqrt(3/float64(s.Shape[1])))) // the whole fan-in: ranks' partial sums add up
}

// Linear makes module.weight (+ its FP8 scale).
func (d *dummySource) Linear(module string) (*kernels.Tensor, error) {
	s, err := d.spec(module + ".weight")
	if err != nil {
		return nil, err
	}
	if s.DType != F8E4M3 {
		return d.Tensor(module + ".weight")
	}
	shape, seed, err := d.cut(s)
	if err != nil {
		return nil, err
	}
	n := shape[0]
	w, err := d.tensor(kernels.F8E4M3, shape...)
	if err != nil {
		return nil, err
	}
	if err := d.fill.Fill(w, seed, 1); err != nil {
		return nil, err
	}
	// Filled e4m3 bytes have |v| up to 120 (rms ~20): scale to ~1/sqrt(k) of the whole fan-in.
	sv := float32(1 / (20 * math.Sqrt(float64(s.Shape[1]))))
	for _, name := range []string{module + ".weight_scale", module + ".weight_scale_inv"} {
		ss, ok := d.specs[name]
		if !ok {
			continue
		}
		var st *kernels.Tensor
		if len(ss.Shape) == 2 && ss.Shape[1] == 1 && ss.Shape[0] == s.Shape[0] {
			w.ScaleLayout = kernels.ScalePerChannel
			st, err = d.tensor(kernels.F32, n)
		} else {
			w.ScaleLayout = kernels.ScaleBlock
			w.ScaleBlock = d.c.Quantization.BlockSize
			var sshape []int
			if sshape, _, err = d.cut(ss); err != nil {
				return nil, err
			}
			st, err = d.tensor(kernels.F32, sshape...)
		}
		if err != nil {
			return nil, err
		}
		w.Scale = st
		return w, d.fill.FillConst(st, sv)
	}
	return nil, fmt.Errorf("FP8 %s has no scale in the tensor list", module)
}

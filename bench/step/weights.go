package step

import (
	"fmt"
	"math"
	"strings"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/model"
)

// dummyWeights makes every tensor of cfg's first layers on the GPU with
// random values (vLLM's --load-format dummy): full-size shapes and dtypes
// (FP8 with its scales) without a checkpoint. Values are scaled ~1/sqrt(fan_in)
// so activations stay finite through the layers.
type dummyWeights struct {
	be    *cuda.Backend
	cfg   *model.Config
	specs map[string]model.TensorSpec
	seed  uint64
	all   []*kernels.Tensor
}

func newDummy(be *cuda.Backend, cfg *model.Config) *dummyWeights {
	d := &dummyWeights{be: be, cfg: cfg, specs: map[string]model.TensorSpec{}}
	for _, s := range cfg.Tensors() {
		d.specs[s.Name] = s
	}
	return d
}

func (d *dummyWeights) free() {
	for _, t := range d.all {
		d.be.Free(t)
	}
	d.all = nil
}

func (d *dummyWeights) spec(name string) (model.TensorSpec, error) {
	s, ok := d.specs[name]
	if !ok {
		return s, fmt.Errorf("dummy weights: %s is not in the config's tensor list", name)
	}
	return s, nil
}

// Tensor makes a non-linear tensor: norms are ones, biases small, tables random.
func (d *dummyWeights) Tensor(name string) (*kernels.Tensor, error) {
	s, err := d.spec(name)
	if err != nil {
		return nil, err
	}
	shape := make([]int, len(s.Shape))
	for i, x := range s.Shape {
		shape[i] = int(x)
	}
	d.seed++
	if len(shape) == 1 { // norms, biases, correction bias: F32 on the device
		t, err := d.be.NewTensor(kernels.F32, shape...)
		if err != nil {
			return nil, err
		}
		d.all = append(d.all, t)
		if strings.HasSuffix(name, "norm.weight") {
			return t, d.be.FillConst(t, 1)
		}
		return t, d.be.Fill(t, d.seed, 0.02)
	}
	t, err := d.be.NewTensor(kernels.BF16, shape...)
	if err != nil {
		return nil, err
	}
	d.all = append(d.all, t)
	return t, d.be.Fill(t, d.seed, float32(math.Sqrt(3/float64(shape[1]))))
}

// Linear makes module.weight (+ its FP8 scale).
func (d *dummyWeights) Linear(module string) (*kernels.Tensor, error) {
	s, err := d.spec(module + ".weight")
	if err != nil {
		return nil, err
	}
	if s.DType != model.F8E4M3 {
		return d.Tensor(module + ".weight")
	}
	n, k := int(s.Shape[0]), int(s.Shape[1])
	w, err := d.be.NewTensor(kernels.F8E4M3, n, k)
	if err != nil {
		return nil, err
	}
	d.all = append(d.all, w)
	d.seed++
	if err := d.be.Fill(w, d.seed, 1); err != nil {
		return nil, err
	}
	// Random e4m3 bytes have |v| up to 120 (rms ~20): scale to ~1/sqrt(k).
	sv := float32(1 / (20 * math.Sqrt(float64(k))))
	for _, name := range []string{module + ".weight_scale", module + ".weight_scale_inv"} {
		ss, ok := d.specs[name]
		if !ok {
			continue
		}
		var st *kernels.Tensor
		if len(ss.Shape) == 2 && ss.Shape[1] == 1 && ss.Shape[0] == s.Shape[0] {
			w.ScaleLayout = kernels.ScalePerChannel
			st, err = d.be.NewTensor(kernels.F32, n)
		} else {
			w.ScaleLayout = kernels.ScaleBlock
			w.ScaleBlock = d.cfg.Quantization.BlockSize
			st, err = d.be.NewTensor(kernels.F32, int(ss.Shape[0]), int(ss.Shape[1]))
		}
		if err != nil {
			return nil, err
		}
		w.Scale = st
		return w, d.be.FillConst(st, sv)
	}
	return nil, fmt.Errorf("dummy weights: FP8 %s has no scale in the tensor list", module)
}

// weights builds a whole-model Weights (every layer of cfg, embedding,
// final norm, lm_head; no MTP layer).
func (d *dummyWeights) weights() (*model.Weights, error) {
	c := d.cfg
	return model.Assemble(c, model.Selection{EndLayer: c.NumHiddenLayers, Embedding: true, LMHead: true}, d)
}

// tensorBytes is what reading t (and its scale) costs.
func tensorBytes(ts ...*kernels.Tensor) int64 {
	var n int64
	for _, t := range ts {
		if t == nil {
			continue
		}
		n += int64(t.Elements() * t.DType.Size())
		if t.Scale != nil {
			n += int64(t.Scale.Elements() * t.Scale.DType.Size())
		}
	}
	return n
}

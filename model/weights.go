package model

import (
	"context"
	"fmt"
	"math"
	"slices"
	"sync/atomic"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model/safetensors"
)

// Selection says which part of a checkpoint a stage loads: a pipeline stage
// holds a layer range, only the head holds embeddings (and the MTP layer) and
// only the tail the final norm and lm_head; expert parallelism loads a subset of experts.
type Selection struct {
	FirstLayer, EndLayer int  // main decoder layers [FirstLayer, EndLayer)
	Embedding            bool // model.embed_tokens
	LMHead               bool // model.norm and lm_head
	MTP                  bool // the MTP layer (needs the head's embeddings and hidden states)
	// Expert reports whether routed expert e of layer l is loaded; nil loads all.
	Expert func(layer, expert int) bool
	// Shard, when set, loads only a rank's slices of the decoder layers'
	// split tensors (shard.go); nil loads them whole.
	Shard *Shard
}

// WholeModel selects everything, for a single-process engine.
func WholeModel(c *Config) Selection {
	return Selection{FirstLayer: 0, EndLayer: c.NumHiddenLayers, Embedding: true, LMHead: true, MTP: c.HasMTP()}
}

// LayerWeights are one decoder layer's tensors on a backend.
type LayerWeights struct {
	Index               int
	Kind                LayerKind
	InputNorm, PostNorm *kernels.Tensor
	Q, K, V, O          *kernels.Tensor
	QBias, KBias, VBias *kernels.Tensor // nil without attention_bias
	QNorm, KNorm        *kernels.Tensor // nil without use_qk_norm
	// Dense MLP (LayerDense).
	Gate, Up, Down *kernels.Tensor
	// MoE (LayerMoE, LayerMTP).
	Router, RouterBias               *kernels.Tensor
	Experts                          []*kernels.Expert // indexed by expert id; nil when not loaded
	SharedGate, SharedUp, SharedDown *kernels.Tensor   // nil without shared experts
	// MTP extras (LayerMTP).
	Embed, ENorm, HNorm, EHProj, HeadNorm, Head *kernels.Tensor
}

// Weights are a stage's tensors on a backend.
type Weights struct {
	Config    *Config
	Selection Selection
	Embed     *kernels.Tensor // nil unless Selection.Embedding
	FinalNorm *kernels.Tensor // nil unless Selection.LMHead
	LMHead    *kernels.Tensor
	Layers    []*LayerWeights // Selection.FirstLayer .. EndLayer-1
	MTP       *LayerWeights   // nil unless Selection.MTP
	// Bytes is the checkpoint bytes the stage uses.
	Bytes int64

	ckpt *safetensors.Checkpoint
}

// Close releases the checkpoint mapping (CPU weights alias it).
func (w *Weights) Close() error {
	if w.ckpt == nil {
		return nil
	}
	err := w.ckpt.Close()
	w.ckpt = nil
	return err
}

// Progress reports loading progress in bytes.
type Progress func(done, total int64)

// LoadWeights reads the selected tensors of the checkpoint in dir and makes
// backend tensors of them. Every tensor's dtype and shape are checked against
// the config's tensor list (FP8 per the checkpoint's quantization_config).
func LoadWeights(ctx context.Context, dir string, cfg *Config, sel Selection, be kernels.Backend, progress Progress) (*Weights, error) {
	if sel.FirstLayer < 0 || sel.EndLayer > cfg.NumHiddenLayers || sel.FirstLayer > sel.EndLayer {
		return nil, fmt.Errorf("load %s: layer range [%d,%d) outside [0,%d)", dir, sel.FirstLayer, sel.EndLayer, cfg.NumHiddenLayers)
	}
	if sel.MTP && !cfg.HasMTP() {
		return nil, fmt.Errorf("load %s: the config has no MTP layer", dir)
	}
	ck, err := safetensors.OpenDir(dir)
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", dir, err)
	}
	if p, ok := be.(kernels.WeightPacker); ok { // weights share pages (kernels/cuda/slab.go)
		p.PackWeights(true)
		defer p.PackWeights(false)
	}
	l := &loader{ctx: ctx, ck: ck, cfg: cfg, be: be, progress: progress}
	w, err := l.load(sel)
	if err != nil {
		ck.Close()
		return nil, fmt.Errorf("load %s: %w", dir, err)
	}
	w.ckpt = ck
	return w, nil
}

type loader struct {
	ctx      context.Context
	ck       *safetensors.Checkpoint
	cfg      *Config
	be       kernels.Backend
	progress Progress
	shard    *Shard
	specs    map[string]TensorSpec
	order    []TensorSpec // specs in checkpoint order
	done     atomic.Int64
	total    int64
	kept     int64 // bytes of the rank's slices
}

func (l *loader) load(sel Selection) (*Weights, error) {
	if l.shard = sel.Shard; l.shard != nil {
		if err := l.shard.Validate(l.cfg); err != nil {
			return nil, err
		}
	}
	l.specs = map[string]TensorSpec{}
	for _, t := range l.cfg.Tensors() {
		if sel.Includes(l.cfg, t) {
			l.specs[t.Name] = t
			l.order = append(l.order, t)
			l.total += t.Bytes() // read whole (mapped), so progress counts them whole
			l.kept += shardBytes(l.cfg, l.shard, t)
		}
	}
	if err := l.checkOnDisk(); err != nil {
		return nil, err
	}
	w, err := Assemble(l.cfg, sel, l)
	if err != nil {
		return nil, err
	}
	w.Bytes = l.kept
	return w, nil
}

// checkOnDisk compares every selected tensor's dtype and shape with the
// checkpoint's headers, in checkpoint order, before anything is allocated: a
// config.json that does not describe the tensors on disk is refused at once,
// whatever sizes it claims.
func (l *loader) checkOnDisk() error {
	for _, s := range l.order {
		info, ok := l.ck.Info(s.Name)
		if !ok {
			return fmt.Errorf("tensor %s is not in the checkpoint: config.json does not describe these shards", s.Name)
		}
		if err := checkTensor(s, info.DType, info.Shape, info.File); err != nil {
			return err
		}
	}
	return nil
}

// spec returns the expected spec of a tensor the selection includes.
func (l *loader) spec(name string) (TensorSpec, error) {
	s, ok := l.specs[name]
	if !ok {
		return s, fmt.Errorf("tensor %s is not part of the selected stage (loader bug)", name)
	}
	return s, nil
}

// read fetches a tensor and checks it against its spec (dtype, shape).
func (l *loader) read(s TensorSpec) (safetensors.Tensor, error) {
	if err := l.ctx.Err(); err != nil {
		return safetensors.Tensor{}, err
	}
	t, err := l.ck.Tensor(s.Name)
	if err != nil {
		return t, err
	}
	if err := checkTensor(s, t.DType, t.Shape, t.File); err != nil {
		return t, err
	}
	l.done.Add(t.ByteSize())
	if l.progress != nil {
		l.progress(l.done.Load(), l.total)
	}
	return t, nil
}

// checkTensor checks a stored tensor's dtype and shape against its spec.
func checkTensor(s TensorSpec, dt safetensors.DType, shape []int64, file string) error {
	if !slices.Equal(shape, s.Shape) {
		return fmt.Errorf("tensor %s in %s: shape %v, config implies %v", s.Name, file, shape, s.Shape)
	}
	ok := string(dt) == string(s.DType)
	// Norms, biases and the correction bias may be stored in any float type; we convert.
	if !ok && (len(s.Shape) == 1 || s.ScaleOf != "") && (dt == safetensors.F32 || dt == safetensors.BF16 || dt == safetensors.F16) {
		ok = true
	}
	if !ok {
		return fmt.Errorf("tensor %s in %s: dtype %s, config implies %s%s", s.Name, file, dt, s.DType, quantHint(s))
	}
	return nil
}

func quantHint(s TensorSpec) string {
	switch s.DType {
	case F8E4M3:
		return " (quantization_config says this module is FP8)"
	case BF16:
		return " (quantization_config keeps this module unquantized)"
	}
	return ""
}

// Tensor loads a non-linear tensor (norms, biases, embeddings, router).
func (l *loader) Tensor(name string) (*kernels.Tensor, error) {
	s, err := l.spec(name)
	if err != nil {
		return nil, err
	}
	t, err := l.read(s)
	if err != nil {
		return nil, err
	}
	if t, err = l.cut(s, t); err != nil {
		return nil, err
	}
	return l.upload(t)
}

func (l *loader) upload(t safetensors.Tensor) (*kernels.Tensor, error) {
	shape := make([]int, len(t.Shape))
	for i, d := range t.Shape {
		shape[i] = int(d)
	}
	var dt kernels.DType
	data := t.Data
	switch t.DType {
	case safetensors.BF16:
		dt = kernels.BF16
	case safetensors.F8E4M3:
		dt = kernels.F8E4M3
	case safetensors.F32:
		dt = kernels.F32
	case safetensors.F16:
		f, err := t.Float32()
		if err != nil {
			return nil, err
		}
		dt, data = kernels.F32, f32Bytes(f)
	default:
		return nil, fmt.Errorf("tensor %s in %s: dtype %s cannot be a weight", t.Name, t.File, t.DType)
	}
	kt, err := l.be.UploadWeight(dt, shape, data)
	if err != nil {
		return nil, fmt.Errorf("tensor %s: %w", t.Name, err)
	}
	return kt, nil
}

// Linear loads module.weight and, when FP8, its scale.
func (l *loader) Linear(module string) (*kernels.Tensor, error) {
	s, err := l.spec(module + ".weight")
	if err != nil {
		return nil, err
	}
	t, err := l.read(s)
	if err != nil {
		return nil, err
	}
	if t, err = l.cut(s, t); err != nil {
		return nil, err
	}
	w, err := l.upload(t)
	if err != nil {
		return nil, err
	}
	if s.DType != F8E4M3 {
		return w, nil
	}
	var scale TensorSpec
	for _, name := range []string{module + ".weight_scale", module + ".weight_scale_inv"} {
		if sp, ok := l.specs[name]; ok {
			scale = sp
		}
	}
	if scale.Name == "" {
		return nil, fmt.Errorf("FP8 weight %s has no scale in the tensor list", s.Name)
	}
	st, err := l.read(scale)
	if err != nil {
		return nil, err
	}
	if st, err = l.cut(scale, st); err != nil {
		return nil, err
	}
	sv, err := st.Float32()
	if err != nil {
		return nil, err
	}
	for i, v := range sv {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) || v < 0 {
			return nil, fmt.Errorf("tensor %s in %s: scale[%d] = %g is not a finite non-negative number", st.Name, st.File, i, v)
		}
	}
	n := int(t.Shape[0]) // the rank's rows, when sharded
	if len(scale.Shape) == 2 && scale.Shape[1] == 1 && scale.Shape[0] == s.Shape[0] {
		w.ScaleLayout = kernels.ScalePerChannel
		w.Scale, err = l.be.UploadWeight(kernels.F32, []int{n}, f32Bytes(sv))
	} else {
		q := l.cfg.Quantization
		w.ScaleLayout = kernels.ScaleBlock
		w.ScaleBlock = q.BlockSize
		w.Scale, err = l.be.UploadWeight(kernels.F32, []int{int(st.Shape[0]), int(st.Shape[1])}, f32Bytes(sv))
	}
	if err != nil {
		return nil, fmt.Errorf("tensor %s: %w", st.Name, err)
	}
	return w, nil
}

func f32Bytes(f []float32) []byte {
	b := make([]byte, 4*len(f))
	safetensors.F32ToBytes(b, f)
	return b
}

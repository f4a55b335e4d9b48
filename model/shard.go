package model

import (
	"fmt"
	"strings"

	"github.com/glmtopo/glmtopo/model/safetensors"
)

// Shard is one rank's part of decoder layers split over several ranks
// (parallel/tp builds one per rank from its grid). Attention heads, the
// dense MLP and the shared expert are split TP ways and the rank holds
// slice TPRank; every routed expert it holds is split ExpertTP ways by the
// intermediate dimension and it holds slice ExpertTPRank (ExpertTP is 1
// under expert parallelism: whole experts). KV heads are split when there
// are at least TP of them; with fewer, each rank holds the one KV head its
// query heads read, a copy shared by TP/kv ranks, as vLLM replicates them.
//
// Column-parallel projections (q/k/v, gate/up) keep rows of [N,K]; the
// row-parallel ones (o_proj, down_proj) keep columns, and the ranks' partial
// outputs are summed by an all-reduce (model.Forward with RankComm).
type Shard struct {
	TP, TPRank             int
	ExpertTP, ExpertTPRank int
}

// Split is how a rank cuts one stored tensor: Dim 0 keeps rows [Start, End),
// Dim 1 columns; Dim -1 keeps the tensor whole.
type Split struct{ Dim, Start, End int }

var whole = Split{Dim: -1}

// Whole reports whether the tensor is kept uncut.
func (s Split) Whole() bool { return s.Dim < 0 }

// Heads are the rank's query heads [q0, q1) and KV heads [kv0, kv1).
func (s *Shard) Heads(c *Config) (q0, q1, kv0, kv1 int) {
	h, kv := c.NumAttentionHeads, c.NumKeyValueHeads
	q0, q1 = s.TPRank*h/s.TP, (s.TPRank+1)*h/s.TP
	if kv >= s.TP {
		return q0, q1, s.TPRank * kv / s.TP, (s.TPRank + 1) * kv / s.TP
	}
	kv0 = q0 / (h / kv) // the KV head this rank's query heads share
	return q0, q1, kv0, kv0 + 1
}

// Validate checks that c splits this way: heads, KV heads and intermediate
// sizes divide, and FP8 block-scaled weights split on block boundaries
// (vLLM refuses such splits too; the CPU reference does not dequantize).
func (s *Shard) Validate(c *Config) error {
	if s.TP < 1 || s.TPRank < 0 || s.TPRank >= s.TP || s.ExpertTP < 1 || s.ExpertTPRank < 0 || s.ExpertTPRank >= s.ExpertTP {
		return fmt.Errorf("shard: rank %d of TP %d, expert slice %d of %d", s.TPRank, s.TP, s.ExpertTPRank, s.ExpertTP)
	}
	h, kv := c.NumAttentionHeads, c.NumKeyValueHeads
	switch {
	case h%s.TP != 0:
		return fmt.Errorf("tensor parallel %d does not divide the %d attention heads", s.TP, h)
	case kv%s.TP != 0 && s.TP%kv != 0:
		return fmt.Errorf("tensor parallel %d neither divides nor is a multiple of the %d KV heads", s.TP, kv)
	case c.IntermediateSize%s.TP != 0 && c.FirstKDenseReplace > 0:
		return fmt.Errorf("tensor parallel %d does not divide the dense MLP's intermediate size %d", s.TP, c.IntermediateSize)
	case c.NSharedExperts > 0 && (c.MoEIntermediateSize*c.NSharedExperts)%s.TP != 0:
		return fmt.Errorf("tensor parallel %d does not divide the shared expert's intermediate size %d", s.TP, c.MoEIntermediateSize*c.NSharedExperts)
	case c.MoEIntermediateSize%s.ExpertTP != 0:
		return fmt.Errorf("splitting routed experts %d ways does not divide their intermediate size %d", s.ExpertTP, c.MoEIntermediateSize)
	}
	if c.Quantization == nil || c.Quantization.Scheme != QuantBlock {
		return nil
	}
	// Every layer kind's tensors are cut alike: check one layer of each.
	seen := map[LayerKind]bool{}
	for i := 0; i < c.NumHiddenLayers; i++ {
		if k := c.LayerKind(i); !seen[k] {
			seen[k] = true
			for _, t := range c.LayerTensors(i) {
				if t.ScaleOf == "" {
					continue
				}
				if _, err := s.SplitOf(c, t); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// SplitOf says how the rank cuts tensor t of c: a weight, bias or FP8 scale.
func (s *Shard) SplitOf(c *Config, t TensorSpec) (Split, error) {
	if s == nil || t.Layer < 0 {
		return whole, nil
	}
	if t.ScaleOf == "" {
		w, _ := s.weightSplit(c, t.Name, t.Role)
		return w, nil
	}
	w, n := s.weightSplit(c, t.ScaleOf, t.Role)
	if w.Whole() {
		return whole, nil
	}
	if len(t.Shape) == 2 && t.Shape[1] == 1 { // per-channel [N,1]: rows follow the weight's
		if w.Dim == 0 {
			return w, nil
		}
		return whole, nil
	}
	q := c.Quantization
	if q == nil || q.BlockSize[0] <= 0 || q.BlockSize[1] <= 0 {
		return whole, fmt.Errorf("%s: block scale without a block size", t.Name)
	}
	b := q.BlockSize[w.Dim]
	if w.Start%b != 0 || (w.End%b != 0 && w.End != n) {
		return whole, fmt.Errorf("%s: this rank's %s [%d,%d) do not fall on the FP8 block of %d (vLLM refuses such a split too): use a tensor-parallel size that cuts it in multiples of %d",
			t.ScaleOf, [2]string{"rows", "columns"}[w.Dim], w.Start, w.End, b, b)
	}
	return Split{Dim: w.Dim, Start: w.Start / b, End: (w.End + b - 1) / b}, nil
}

// weightSplit is the cut of a linear weight or bias (a 1-D bias follows
// its weight's rows), and the size of the dimension it cuts; a cut that
// keeps the whole dimension (TP 1) is no cut.
func (s *Shard) weightSplit(c *Config, name string, role TensorRole) (Split, int) {
	sp, n := s.rawSplit(c, name, role)
	if sp.Whole() || (sp.Start == 0 && sp.End == n) {
		return whole, n
	}
	return sp, n
}

func (s *Shard) rawSplit(c *Config, name string, role TensorRole) (Split, int) {
	module := strings.TrimSuffix(strings.TrimSuffix(name, ".weight"), ".bias")
	proj := module[strings.LastIndex(module, ".")+1:]
	slice := func(n, parts, rank int) (int, int) { return rank * n / parts, (rank + 1) * n / parts }
	byInter := func(n, parts, rank int) (Split, int) {
		a, b := slice(n, parts, rank)
		switch proj {
		case "gate_proj", "up_proj":
			return Split{Dim: 0, Start: a, End: b}, n
		case "down_proj":
			return Split{Dim: 1, Start: a, End: b}, n
		}
		return whole, 0
	}
	switch role {
	case RoleAttention:
		q0, q1, kv0, kv1 := s.Heads(c)
		d := c.HeadDim
		switch proj {
		case "q_proj":
			return Split{Dim: 0, Start: q0 * d, End: q1 * d}, c.QDim()
		case "k_proj", "v_proj":
			return Split{Dim: 0, Start: kv0 * d, End: kv1 * d}, c.KVDim()
		case "o_proj":
			return Split{Dim: 1, Start: q0 * d, End: q1 * d}, c.QDim()
		}
	case RoleDenseMLP:
		return byInter(c.IntermediateSize, s.TP, s.TPRank)
	case RoleSharedExpert:
		return byInter(c.MoEIntermediateSize*c.NSharedExperts, s.TP, s.TPRank)
	case RoleRoutedExpert:
		return byInter(c.MoEIntermediateSize, s.ExpertTP, s.ExpertTPRank)
	}
	return whole, 0
}

// cutShape is shape after sp.
func cutShape(shape []int, sp Split) []int {
	out := append([]int(nil), shape...)
	if !sp.Whole() {
		out[sp.Dim] = sp.End - sp.Start
	}
	return out
}

// cutTensor keeps sp of a stored tensor: rows alias the stored bytes (a
// mapped checkpoint stays unread outside them); columns are copied.
func cutTensor(t safetensors.Tensor, sp Split) (safetensors.Tensor, error) {
	if sp.Whole() {
		return t, nil
	}
	if sp.Dim >= len(t.Shape) || sp.Start < 0 || sp.End > int(t.Shape[sp.Dim]) || sp.Start >= sp.End {
		return t, fmt.Errorf("tensor %s %v: cannot keep [%d,%d) of dim %d", t.Name, t.Shape, sp.Start, sp.End, sp.Dim)
	}
	es := t.DType.Size()
	rowBytes := es
	for _, d := range t.Shape[1:] {
		rowBytes *= int(d)
	}
	out := t
	out.Shape = append([]int64(nil), t.Shape...)
	out.Shape[sp.Dim] = int64(sp.End - sp.Start)
	if sp.Dim == 0 {
		out.Data = t.Data[sp.Start*rowBytes : sp.End*rowBytes]
		return out, nil
	}
	rows := int(t.Shape[0])
	w := (sp.End - sp.Start) * es
	out.Data = make([]byte, rows*w)
	for r := 0; r < rows; r++ {
		copy(out.Data[r*w:(r+1)*w], t.Data[r*rowBytes+sp.Start*es:])
	}
	return out, nil
}

// cut applies the selection's shard to a tensor read for spec s.
func (l *loader) cut(s TensorSpec, t safetensors.Tensor) (safetensors.Tensor, error) {
	sp, err := l.shard.SplitOf(l.cfg, s)
	if err != nil {
		return t, err
	}
	return cutTensor(t, sp)
}

// shardBytes is the bytes of t a rank holding sh keeps.
func shardBytes(c *Config, sh *Shard, t TensorSpec) int64 {
	sp, err := sh.SplitOf(c, t)
	if err != nil || sp.Whole() {
		return t.Bytes()
	}
	return t.Bytes() / t.Shape[sp.Dim] * int64(sp.End-sp.Start)
}

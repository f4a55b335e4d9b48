package modeltest

import (
	"context"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/model/safetensors"
)

// Golden reads a fixture's reference outputs (a safetensors directory of
// prompts, logits, hidden states and greedy tokens); a missing or mistyped
// tensor fails the test at once.
type Golden struct {
	ck *safetensors.Checkpoint
	t  testing.TB
}

// OpenGolden opens the goldens in dir, closed when the test ends.
func OpenGolden(t testing.TB, dir string) *Golden {
	t.Helper()
	ck, err := safetensors.OpenDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ck.Close() })
	return &Golden{ck, t}
}

// F32 is tensor name as float32 values.
func (g *Golden) F32(name string) []float32 {
	g.t.Helper()
	tt, err := g.ck.Tensor(name)
	if err != nil {
		g.t.Fatal(err)
	}
	v, err := tt.Float32()
	if err != nil {
		g.t.Fatal(err)
	}
	return v
}

// IDs is integer tensor name (token ids) as int32.
func (g *Golden) IDs(name string) []int32 {
	g.t.Helper()
	tt, err := g.ck.Tensor(name)
	if err != nil {
		g.t.Fatal(err)
	}
	v, err := tt.Int64()
	if err != nil {
		g.t.Fatal(err)
	}
	out := make([]int32, len(v))
	for i, x := range v {
		out[i] = int32(x)
	}
	return out
}

// LoadWeights loads the whole checkpoint in dir (config.json and shards)
// onto be; the weights are released when the test ends.
func LoadWeights(t testing.TB, be kernels.Backend, dir string) *model.Weights {
	t.Helper()
	cfg, err := model.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	w, err := model.LoadWeights(context.Background(), dir, cfg, model.WholeModel(cfg), be, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	return w
}

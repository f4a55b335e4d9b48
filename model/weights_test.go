package model

import (
	"context"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/model/safetensors"
)

var tinyDir = filepath.Join("..", "testdata", "glm4moe", "tiny", "model")

// effective reads a loaded weight [N,K] back as the backend sees it: x = I gives out[k][n] = w[n][k].
func effective(t *testing.T, be kernels.Backend, w *kernels.Tensor) []float32 {
	t.Helper()
	n, k := w.Shape[0], w.Shape[1]
	eye, _ := be.NewTensor(kernels.F32, k, k)
	id := make([]float32, k*k)
	for i := 0; i < k; i++ {
		id[i*k+i] = 1
	}
	b := make([]byte, 4*len(id))
	safetensors.F32ToBytes(b, id)
	be.Upload(eye, b)
	out, _ := be.NewTensor(kernels.F32, k, n)
	if err := be.Linear(out, eye, w, nil); err != nil {
		t.Fatal(err)
	}
	v, _ := be.Download(out)
	wt := make([]float32, n*k)
	for r := 0; r < n; r++ {
		for c := 0; c < k; c++ {
			wt[r*k+c] = v[c*n+r]
		}
	}
	return wt
}

func TestFP8CheckpointsBothWays(t *testing.T) {
	src, err := safetensors.OpenDir(tinyDir)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	for _, q := range []*Quantization{FP8PerChannel(), FP8Block()} {
		t.Run(q.Scheme.String(), func(t *testing.T) {
			dst := t.TempDir()
			cfg, err := QuantizeCheckpoint(context.Background(), tinyDir, dst, q)
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Quantization == nil || cfg.Quantization.Scheme != q.Scheme {
				t.Fatalf("reloaded config lost its quantization: %+v", cfg.Quantization)
			}
			be := cpu.New(0)
			w, err := LoadWeights(context.Background(), dst, cfg, WholeModel(cfg), be, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close()
			checked := 0
			check := func(name string, wt *kernels.Tensor) {
				ref, err := src.Tensor(name)
				if err != nil {
					t.Fatal(err)
				}
				want, _ := ref.Float32()
				got := effective(t, be, wt)
				var amax float64
				for _, v := range want {
					amax = math.Max(amax, math.Abs(float64(v)))
				}
				for i := range want {
					// e4m3 has 3 mantissa bits: half a step is 2^-4 relative, plus the
					// subnormal floor of the scale's range (2^-10 of the max).
					bound := math.Abs(float64(want[i]))/16 + amax/448*math.Pow(2, -10)*448/16 + 1e-7
					if d := math.Abs(float64(got[i] - want[i])); d > bound {
						t.Fatalf("%s[%d]: %g vs source %g (bound %g)", name, i, got[i], want[i], bound)
					}
				}
				if wt.DType != kernels.F8E4M3 {
					t.Errorf("%s loaded as %v, want f8e4m3", name, wt.DType)
				}
				checked++
			}
			for _, lw := range w.Layers {
				check("model.layers."+itoa(lw.Index)+".self_attn.q_proj.weight", lw.Q)
				if lw.Kind == LayerMoE {
					check("model.layers."+itoa(lw.Index)+".mlp.experts.5.down_proj.weight", lw.Experts[5].Down)
					check("model.layers."+itoa(lw.Index)+".mlp.shared_experts.gate_proj.weight", lw.SharedGate)
				} else {
					check("model.layers."+itoa(lw.Index)+".mlp.up_proj.weight", lw.Up)
				}
			}
			if w.LMHead.DType != kernels.BF16 {
				t.Errorf("lm_head is %v: quantization_config keeps it bf16", w.LMHead.DType)
			}
			t.Logf("%s: %d weights within e4m3 rounding of the bf16 source", q.Scheme, checked)
		})
	}
}

func itoa(i int) string { return strconv.Itoa(i) }

func TestLoadSelection(t *testing.T) {
	cfg, _ := LoadConfig(tinyDir)
	be := cpu.New(1)
	sel := Selection{FirstLayer: 0, EndLayer: 2, Expert: func(l, e int) bool { return e%2 == 0 }}
	w, err := LoadWeights(context.Background(), tinyDir, cfg, sel, be, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if len(w.Layers) != 2 || w.Layers[1].Index != 1 || w.Embed != nil || w.LMHead != nil || w.MTP != nil {
		t.Fatalf("selection loaded the wrong parts: %d layers", len(w.Layers))
	}
	for e, ex := range w.Layers[1].Experts {
		if (ex != nil) != (e%2 == 0) {
			t.Errorf("expert %d loaded=%v", e, ex != nil)
		}
	}
	if mapped := w.ckpt.Mapped(); len(mapped) != 1 {
		t.Errorf("a stage of layers 0-1 mapped shards %v; they all live in shard 1", mapped)
	}
	if _, err := LoadWeights(context.Background(), tinyDir, cfg, Selection{FirstLayer: 2, EndLayer: 9}, be, nil); err == nil {
		t.Error("layer range beyond the model accepted")
	}
}

// copyFixture copies the tiny checkpoint so a test can break it.
func copyFixture(t *testing.T) string {
	dst := t.TempDir()
	ents, _ := os.ReadDir(tinyDir)
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(tinyDir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(dst, e.Name()), b, 0o644)
	}
	return dst
}

func TestLoadBadCheckpoints(t *testing.T) {
	shard2 := "model-00002-of-00002.safetensors"
	cases := []struct {
		name   string
		break_ func(t *testing.T, dir string) *Config
		want   []string
	}{
		{"truncated shard", func(t *testing.T, dir string) *Config {
			p := filepath.Join(dir, shard2)
			st, _ := os.Stat(p)
			os.Truncate(p, st.Size()-1000)
			return nil
		}, []string{shard2}},
		{"header longer than file", func(t *testing.T, dir string) *Config {
			p := filepath.Join(dir, shard2)
			b, _ := os.ReadFile(p)
			b[0], b[1], b[2], b[3] = 0xff, 0xff, 0xff, 0x00
			os.WriteFile(p, b, 0o644)
			return nil
		}, []string{shard2, "header"}},
		{"missing tensor", func(t *testing.T, dir string) *Config {
			p := filepath.Join(dir, "model.safetensors.index.json")
			b, _ := os.ReadFile(p)
			var idx map[string]any
			json.Unmarshal(b, &idx)
			delete(idx["weight_map"].(map[string]any), "model.layers.2.mlp.experts.3.up_proj.weight")
			b, _ = json.Marshal(idx)
			os.WriteFile(p, b, 0o644)
			return nil
		}, []string{"model.layers.2.mlp.experts.3.up_proj.weight"}},
		{"wrong shape", func(t *testing.T, dir string) *Config {
			c, _ := LoadConfig(dir)
			c = c.Clone()
			c.MoEIntermediateSize = 48
			return c
		}, []string{"model.layers.1.mlp.experts.0.gate_proj.weight", "shape [32 64]", "[48 64]"}},
		{"wrong dtype", func(t *testing.T, dir string) *Config {
			c, _ := LoadConfig(dir)
			c = c.Clone()
			c.Quantization = FP8PerChannel()
			return c
		}, []string{"model.layers.0.self_attn.q_proj.weight", "BF16", "quantization_config"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := copyFixture(t)
			cfg := c.break_(t, dir)
			if cfg == nil {
				var err error
				if cfg, err = LoadConfig(dir); err != nil {
					t.Fatal(err)
				}
			}
			w, err := LoadWeights(context.Background(), dir, cfg, WholeModel(cfg), cpu.New(1), nil)
			if err == nil {
				w.Close()
				t.Fatal("broken checkpoint loaded")
			}
			for _, s := range c.want {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not mention %q", err, s)
				}
			}
		})
	}
}

func TestLoadCancelled(t *testing.T) {
	cfg, _ := LoadConfig(tinyDir)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := LoadWeights(ctx, tinyDir, cfg, WholeModel(cfg), cpu.New(1), nil); err == nil {
		t.Error("cancelled load succeeded")
	}
}

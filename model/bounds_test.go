package model

import (
	"encoding/json"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// A config.json field that would make a command allocate without bound is
// refused by ParseConfig, naming the field, before any tensor list exists.
func TestParseConfigRefusesHostileSizes(t *testing.T) {
	cases := []struct {
		field string
		value any
		want  string
	}{
		{"num_hidden_layers", 1_000_000_000, "num_hidden_layers"},
		{"num_hidden_layers", 1_000_000, "num_hidden_layers"},
		{"vocab_size", int64(1) << 40, "vocab_size"},
		{"hidden_size", 1 << 30, "hidden_size"},
		{"n_routed_experts", 1 << 20, "n_routed_experts"},
		{"num_attention_heads", 1 << 20, "num_attention_heads"},
		{"head_dim", 1 << 20, "head_dim"},
		{"moe_intermediate_size", 1 << 30, "moe_intermediate_size"},
		{"max_position_embeddings", 0, "max_position_embeddings"},
		{"max_position_embeddings", int64(1) << 40, "max_position_embeddings"},
		{"n_shared_experts", 1 << 20, "n_shared_experts"},
		{"eos_token_id", make([]int, 5000), "eos_token_id"},
		// Every field within its own bound, together too many tensors.
		{"n_routed_experts", 4096, "tensors"},
	}
	for _, tc := range cases {
		t.Run(tc.field, func(t *testing.T) {
			m := fixtureConfigJSON(t)
			m[tc.field] = tc.value
			if tc.want == "tensors" {
				m["num_hidden_layers"] = 1024
				m["num_experts_per_tok"] = 8
			}
			data, _ := json.Marshal(m)
			start := time.Now()
			_, err := ParseConfig(data)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("%s=%v: err %v, want one naming %s", tc.field, tc.value, err, tc.want)
			}
			if d := time.Since(start); d > time.Second {
				t.Errorf("refusal took %v", d)
			}
		})
	}
}

// The largest config the bounds admit still summarizes within the
// acceptance bound of 1 GB and 5 s (measured as bytes allocated).
func TestLargestAdmittedConfigIsCheap(t *testing.T) {
	m := fixtureConfigJSON(t)
	m["num_hidden_layers"] = maxLayers
	m["n_routed_experts"] = 128 // 1024 × (6×128+32) ≈ 819k tensors: just under maxTensors
	m["num_experts_per_tok"] = 8
	data, _ := json.Marshal(m)
	c, err := ParseConfig(data)
	if err != nil {
		t.Fatal(err)
	}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	start := time.Now()
	s := Summarize(c)
	elapsed := time.Since(start)
	runtime.ReadMemStats(&after)
	if s.Layers != maxLayers {
		t.Fatalf("summary %+v", s)
	}
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 1<<30 {
		t.Errorf("summarizing the largest admitted config allocated %d MB", alloc>>20)
	}
	if elapsed > 5*time.Second {
		t.Errorf("summarizing took %v", elapsed)
	}
}

// LoadConfig reads at most MaxConfigBytes: a huge config.json is refused
// without being read into memory.
func TestLoadConfigRefusesHugeFile(t *testing.T) {
	dir := t.TempDir()
	f, err := os.Create(filepath.Join(dir, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(8 << 30); err != nil { // sparse: 8 GB of zeros
		t.Fatal(err)
	}
	f.Close()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err = LoadConfig(dir)
	runtime.ReadMemStats(&after)
	if err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("err %v, want a size refusal", err)
	}
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 16<<20 {
		t.Errorf("refusing the file allocated %d MB", alloc>>20)
	}
}

// Quantized costs O(1) per module however long the ignore list is.
func TestQuantizationIgnoreListIsIndexed(t *testing.T) {
	ignore := make([]string, 50000)
	for i := range ignore {
		ignore[i] = "model.layers.999.mlp.experts." + strings.Repeat("x", i%7) + "proj"
	}
	ignore = append(ignore, "lm_head", "model.layers.0.self_attn.q_proj")
	raw, _ := json.Marshal(map[string]any{"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": []int{128, 128}, "modules_to_not_convert": ignore})
	q, err := parseQuantization(raw)
	if err != nil {
		t.Fatal(err)
	}
	for module, want := range map[string]bool{"lm_head": false, "model.lm_head": false, "model.layers.0.self_attn.q_proj": false,
		"model.layers.1.self_attn.q_proj": true, "x.lm_head.y": true} {
		if got := q.Quantized(module); got != want {
			t.Errorf("Quantized(%q) = %v, want %v", module, got, want)
		}
	}
	start := time.Now()
	for i := 0; i < 100000; i++ {
		q.Quantized("model.layers.1.mlp.experts.7.up_proj")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("100k lookups against a 50k-entry ignore list took %v", d)
	}
}

// FuzzParseConfig: no config.json makes ParseConfig panic, and an accepted
// one has a bounded tensor list and consistent derived sizes.
func FuzzParseConfig(f *testing.F) {
	for _, name := range []string{"tiny", "tiny_qknorm"} {
		if data, err := os.ReadFile(filepath.Join("..", "testdata", "glm4moe", name, "model", "config.json")); err == nil {
			f.Add(data)
		}
	}
	for _, name := range PresetNames() {
		if c, err := Preset(name); err == nil {
			if data, err := c.JSON(); err == nil {
				f.Add(data)
			}
		}
	}
	f.Add([]byte(`{"model_type":"glm4_moe","num_hidden_layers":1000000000}`))
	f.Add([]byte(`{"quantization_config":{"quant_method":"fp8","weight_block_size":[0,0]}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseConfig(data)
		if err != nil {
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("ParseConfig accepted a config Validate refuses: %v", err)
		}
		if n := c.tensorCountBound(); n > maxTensors {
			t.Fatalf("accepted a config of %.0f tensors", n)
		}
		if c.KVBytesPerToken(2) <= 0 || c.RotaryDim() <= 0 || c.RotaryDim() > c.HeadDim {
			t.Fatalf("derived sizes: kv %d, rotary %d of head %d", c.KVBytesPerToken(2), c.RotaryDim(), c.HeadDim)
		}
		if c.tensorCountBound() < 20000 { // the tensor list itself only where it is quick
			specs := c.Tensors()
			if float64(len(specs)) > c.tensorCountBound() {
				t.Fatalf("%d tensors, bound %.0f", len(specs), c.tensorCountBound())
			}
			for _, s := range specs {
				if s.Elements() <= 0 {
					t.Fatalf("tensor %s has shape %v", s.Name, s.Shape)
				}
			}
		}
	})
}

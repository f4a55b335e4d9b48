package model

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func fixtureConfigJSON(t *testing.T) map[string]any {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "testdata", "glm4moe", "tiny", "model", "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestParseConfigFixture(t *testing.T) {
	c, err := LoadConfig(filepath.Join("..", "testdata", "glm4moe", "tiny_qknorm", "model"))
	if err != nil {
		t.Fatal(err)
	}
	if !c.UseQKNorm || c.NumKeyValueHeads != 1 || c.RotaryDim() != 16 || c.RopeTheta != 1e6 || c.NumLayers() != 4 {
		t.Errorf("parsed %+v", c)
	}
	kinds := []LayerKind{LayerDense, LayerMoE, LayerMoE, LayerMTP}
	for i, k := range kinds {
		if c.LayerKind(i) != k {
			t.Errorf("layer %d kind %v, want %v", i, c.LayerKind(i), k)
		}
	}
}

// The tensor list must name exactly the tensors of a published-layout checkpoint.
func TestTensorListMatchesFixtureIndex(t *testing.T) {
	for _, name := range []string{"tiny", "tiny_qknorm"} {
		dir := filepath.Join("..", "testdata", "glm4moe", name, "model")
		c, err := LoadConfig(dir)
		if err != nil {
			t.Fatal(err)
		}
		data, _ := os.ReadFile(filepath.Join(dir, "model.safetensors.index.json"))
		var idx struct {
			WeightMap map[string]string `json:"weight_map"`
		}
		if err := json.Unmarshal(data, &idx); err != nil {
			t.Fatal(err)
		}
		specs := c.Tensors()
		if len(specs) != len(idx.WeightMap) {
			t.Errorf("%s: %d tensors listed, checkpoint has %d", name, len(specs), len(idx.WeightMap))
		}
		for _, s := range specs {
			if _, ok := idx.WeightMap[s.Name]; !ok {
				t.Errorf("%s: listed tensor %s is not in the checkpoint", name, s.Name)
			}
		}
	}
}

func TestParseConfigErrors(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(m map[string]any)
		want   string
	}{
		{"unknown model type", func(m map[string]any) { m["model_type"] = "llama" }, `model_type "llama"`},
		{"heads not divisible", func(m map[string]any) { m["num_key_value_heads"] = 3 }, "not divisible by num_key_value_heads"},
		{"missing fields", func(m map[string]any) { delete(m, "hidden_size"); delete(m, "vocab_size") }, "missing required fields vocab_size, hidden_size"},
		{"dense beyond layers", func(m map[string]any) { m["first_k_dense_replace"] = 9 }, "first_k_dense_replace 9"},
		{"top-k beyond experts", func(m map[string]any) { m["num_experts_per_tok"] = 9 }, "exceeds n_routed_experts"},
		{"bad rope factor", func(m map[string]any) { m["partial_rotary_factor"] = 1.5 }, "partial_rotary_factor"},
		{"bad eos", func(m map[string]any) { m["eos_token_id"] = "x" }, "eos_token_id"},
		{"eos outside vocab", func(m map[string]any) { m["eos_token_id"] = 5000 }, "outside the vocabulary"},
		{"wrong type", func(m map[string]any) { m["hidden_size"] = "big" }, "invalid JSON"},
		{"unsupported rope", func(m map[string]any) { m["rope_parameters"] = map[string]any{"rope_type": "yarn"} }, "rope_type"},
		{"bad quantization", func(m map[string]any) { m["quantization_config"] = map[string]any{"quant_method": "gptq"} }, "gptq"},
		{"tied embeddings", func(m map[string]any) { m["tie_word_embeddings"] = true }, "tie_word_embeddings"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m := fixtureConfigJSON(t)
			c.mutate(m)
			data, _ := json.Marshal(m)
			_, err := ParseConfig(data)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("err %v, want it to mention %q", err, c.want)
			}
		})
	}
	if _, err := ParseConfig([]byte("{not json")); err == nil {
		t.Error("malformed JSON accepted")
	}
}

func TestRopeParametersOverrideFlatFields(t *testing.T) {
	m := fixtureConfigJSON(t)
	delete(m, "rope_theta")
	delete(m, "partial_rotary_factor")
	m["rope_parameters"] = map[string]any{"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.25}
	data, _ := json.Marshal(m)
	c, err := ParseConfig(data)
	if err != nil {
		t.Fatal(err)
	}
	if c.RopeTheta != 5e5 || c.RotaryDim() != 8 {
		t.Errorf("theta %g rotary %d", c.RopeTheta, c.RotaryDim())
	}
}

func TestPresets(t *testing.T) {
	c, err := Preset("glm-4.5")
	if err != nil {
		t.Fatal(err)
	}
	p := c.Params()
	// Model cards: 355B total, 32B active (MTP and embeddings aside).
	if p.Main < 350e9 || p.Main > 360e9 || p.ActiveNonEmbedding < 31e9 || p.ActiveNonEmbedding > 33e9 {
		t.Errorf("glm-4.5 params: %+v", p)
	}
	if kv := c.KVBytesPerToken(2); kv != 368*1024 {
		t.Errorf("glm-4.5 KV per token %d B, want 368 KiB", kv)
	}
	air, _ := Preset("glm-4.5-air")
	pa := air.Params()
	if pa.Main < 105e9 || pa.Main > 108e9 || pa.ActiveNonEmbedding < 11.5e9 || pa.ActiveNonEmbedding > 12.5e9 {
		t.Errorf("air params: %+v", pa)
	}
	fp8, _ := Preset("GLM-4.5-FP8")
	by := fp8.BytesByDType()
	if by[F8E4M3] < 350e9 || by[BF16] > 5e9 {
		t.Errorf("fp8 bytes by dtype %v", by)
	}
	if fp8.Quantization.Quantized("lm_head") || !fp8.Quantization.Quantized("model.layers.3.mlp.experts.0.up_proj") {
		t.Error("fp8 preset quantizes the wrong modules")
	}
	if _, err := Preset("glm-5"); err == nil || !strings.Contains(err.Error(), "glm-4.5-air") {
		t.Errorf("unknown preset error %v should list the known ones", err)
	}
	if c.Hash() == air.Hash() || c.Hash() != mustPreset(t, "glm-4.5").Hash() {
		t.Error("config hash does not identify the architecture")
	}
}

func mustPreset(t *testing.T, name string) *Config {
	c, err := Preset(name)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestQuantizationIgnore(t *testing.T) {
	data := []byte(`{"quant_method":"compressed-tensors","config_groups":{"g":{"targets":["Linear"],"weights":{"num_bits":8,"type":"float","strategy":"block","block_structure":[128,128]}}},"ignore":["lm_head","re:.*self_attn.*"]}`)
	q, err := parseQuantization(data)
	if err != nil {
		t.Fatal(err)
	}
	for module, want := range map[string]bool{
		"lm_head": false, "model.layers.1.self_attn.q_proj": false,
		"model.layers.1.mlp.experts.3.down_proj": true, "model.layers.1.mlp.shared_experts.up_proj": true,
	} {
		if q.Quantized(module) != want {
			t.Errorf("Quantized(%s) = %v", module, !want)
		}
	}
}

func TestWithOverrides(t *testing.T) {
	c, err := Preset("glm-4.5-fp8")
	if err != nil {
		t.Fatal(err)
	}
	d, err := c.WithOverrides(`{"num_hidden_layers": 4, "num_nextn_predict_layers": 0}`)
	if err != nil {
		t.Fatal(err)
	}
	if d.NumHiddenLayers != 4 || d.HasMTP() || d.Quantization == nil || d.HiddenSize != c.HiddenSize {
		t.Fatalf("overridden config: layers %d, mtp %v, quantization %v, hidden %d", d.NumHiddenLayers, d.HasMTP(), d.Quantization != nil, d.HiddenSize)
	}
	if c.NumHiddenLayers != 92 {
		t.Fatalf("the original changed: %d layers", c.NumHiddenLayers)
	}
	for _, bad := range []string{`[1]`, `{"hidden_size": "wide"}`, `{"num_attention_heads": 7}`} {
		if _, err := c.WithOverrides(bad); err == nil {
			t.Errorf("overrides %s: no error", bad)
		}
	}
}

// Package model defines GLM-4.5-class models: configuration, presets, the
// checkpoint's tensor list, weight loading and the layer math.
package model

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// Config is a Hugging Face config.json of model_type glm4_moe, with the fields
// the engine, the planner and the loader need.
type Config struct {
	ModelType             string  `json:"model_type"`
	VocabSize             int     `json:"vocab_size"`
	HiddenSize            int     `json:"hidden_size"`
	IntermediateSize      int     `json:"intermediate_size"`
	MoEIntermediateSize   int     `json:"moe_intermediate_size"`
	NumHiddenLayers       int     `json:"num_hidden_layers"`
	FirstKDenseReplace    int     `json:"first_k_dense_replace"`
	NumAttentionHeads     int     `json:"num_attention_heads"`
	NumKeyValueHeads      int     `json:"num_key_value_heads"`
	HeadDim               int     `json:"head_dim"`
	NRoutedExperts        int     `json:"n_routed_experts"`
	NSharedExperts        int     `json:"n_shared_experts"`
	NumExpertsPerTok      int     `json:"num_experts_per_tok"`
	NGroup                int     `json:"n_group"`
	TopKGroup             int     `json:"topk_group"`
	RoutedScalingFactor   float64 `json:"routed_scaling_factor"`
	NormTopKProb          bool    `json:"norm_topk_prob"`
	PartialRotaryFactor   float64 `json:"partial_rotary_factor"`
	RopeTheta             float64 `json:"rope_theta"`
	UseQKNorm             bool    `json:"use_qk_norm"`
	AttentionBias         bool    `json:"attention_bias"`
	RMSNormEps            float64 `json:"rms_norm_eps"`
	MaxPositionEmbeddings int     `json:"max_position_embeddings"`
	TieWordEmbeddings     bool    `json:"tie_word_embeddings"`
	NumNextNPredictLayers int     `json:"num_nextn_predict_layers"`
	HiddenAct             string  `json:"hidden_act"`
	TorchDType            string  `json:"torch_dtype,omitempty"`
	EOSTokenIDs           []int   `json:"-"`
	PadTokenID            int     `json:"pad_token_id"`

	// Quantization is the checkpoint's quantization_config (nil for bf16).
	Quantization *Quantization `json:"-"`

	// raw is the config.json this was parsed from, for hashing.
	raw []byte
}

// rawConfig holds the fields whose JSON shape varies between checkpoints.
type rawConfig struct {
	EOSTokenID     json.RawMessage `json:"eos_token_id"`
	RopeParameters *struct {
		RopeTheta           *float64 `json:"rope_theta"`
		PartialRotaryFactor *float64 `json:"partial_rotary_factor"`
		RopeType            string   `json:"rope_type"`
	} `json:"rope_parameters"`
	QuantizationConfig json.RawMessage `json:"quantization_config"`
	DType              string          `json:"dtype"`
}

// requiredFields must be present in config.json; the rest have HF defaults.
var requiredFields = []string{
	"vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
	"num_hidden_layers", "num_attention_heads", "num_key_value_heads",
	"n_routed_experts", "num_experts_per_tok",
}

// ParseConfig parses and validates a glm4_moe config.json.
func ParseConfig(data []byte) (*Config, error) {
	if len(data) > MaxConfigBytes {
		return nil, fmt.Errorf("config is %d bytes, larger than %d: not a model config", len(data), MaxConfigBytes)
	}
	var present map[string]json.RawMessage
	if err := json.Unmarshal(data, &present); err != nil {
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	var missing []string
	for _, f := range requiredFields {
		if _, ok := present[f]; !ok {
			missing = append(missing, f)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("missing required fields %s", strings.Join(missing, ", "))
	}
	// HF defaults for optional fields.
	c := &Config{
		NSharedExperts: 1, NGroup: 1, TopKGroup: 1, RoutedScalingFactor: 1,
		NormTopKProb: true, PartialRotaryFactor: 0.5, RopeTheta: 10000,
		AttentionBias: true, RMSNormEps: 1e-5, MaxPositionEmbeddings: 131072,
		HiddenAct: "silu", FirstKDenseReplace: 1,
	}
	if err := json.Unmarshal(data, c); err != nil {
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	var rc rawConfig
	if err := json.Unmarshal(data, &rc); err != nil {
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	if c.TorchDType == "" {
		c.TorchDType = rc.DType
	}
	if rp := rc.RopeParameters; rp != nil {
		// transformers 5.x moves rope settings into rope_parameters; they win over flat fields.
		if rp.RopeType != "" && rp.RopeType != "default" {
			return nil, fmt.Errorf("rope_parameters.rope_type %q is not supported (only default RoPE)", rp.RopeType)
		}
		if rp.RopeTheta != nil {
			c.RopeTheta = *rp.RopeTheta
		}
		if rp.PartialRotaryFactor != nil {
			c.PartialRotaryFactor = *rp.PartialRotaryFactor
		}
	}
	if _, ok := present["head_dim"]; !ok && c.NumAttentionHeads > 0 {
		c.HeadDim = c.HiddenSize / c.NumAttentionHeads
	}
	if len(rc.EOSTokenID) > 0 && string(rc.EOSTokenID) != "null" {
		var one int
		if err := json.Unmarshal(rc.EOSTokenID, &one); err == nil {
			c.EOSTokenIDs = []int{one}
		} else if err := json.Unmarshal(rc.EOSTokenID, &c.EOSTokenIDs); err != nil {
			return nil, fmt.Errorf("eos_token_id must be an int or a list of ints: %w", err)
		}
	}
	if len(rc.QuantizationConfig) > 0 && string(rc.QuantizationConfig) != "null" {
		q, err := parseQuantization(rc.QuantizationConfig)
		if err != nil {
			return nil, err
		}
		c.Quantization = q
	}
	c.raw = append([]byte(nil), data...)
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// LoadConfig reads dir/config.json.
func LoadConfig(dir string) (*Config, error) {
	path := filepath.Join(dir, "config.json")
	data, err := readBounded(path, MaxConfigBytes)
	if err != nil {
		return nil, fmt.Errorf("load config: %w", err)
	}
	c, err := ParseConfig(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// readBounded reads at most limit bytes of path; a longer file is an error
// (read through a LimitReader, so a huge or endless file costs nothing).
func readBounded(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("%s is larger than %d bytes: not a model config", path, limit)
	}
	return data, nil
}

// Resolve returns the config of a preset name (see PresetNames) or of a
// checkpoint directory.
func Resolve(nameOrDir string) (*Config, error) {
	if c, err := Preset(nameOrDir); err == nil {
		return c, nil
	}
	if st, err := os.Stat(nameOrDir); err == nil && st.IsDir() {
		return LoadConfig(nameOrDir)
	}
	return nil, fmt.Errorf("model %q is neither a preset (%s) nor a checkpoint directory",
		nameOrDir, strings.Join(PresetNames(), ", "))
}

// Validate reports the first inconsistency in c as a clear error.
func (c *Config) Validate() error {
	fail := func(format string, args ...any) error {
		return fmt.Errorf("invalid glm4_moe config: "+format, args...)
	}
	if c.ModelType != "glm4_moe" {
		return fail("model_type %q is not supported (want glm4_moe)", c.ModelType)
	}
	if err := c.checkBounds(); err != nil {
		return fail("%w", err)
	}
	switch {
	case c.NumAttentionHeads%c.NumKeyValueHeads != 0:
		return fail("num_attention_heads %d is not divisible by num_key_value_heads %d", c.NumAttentionHeads, c.NumKeyValueHeads)
	case c.FirstKDenseReplace < 0 || c.FirstKDenseReplace > c.NumHiddenLayers:
		return fail("first_k_dense_replace %d is outside [0, num_hidden_layers=%d]", c.FirstKDenseReplace, c.NumHiddenLayers)
	case c.NumExpertsPerTok > c.NRoutedExperts:
		return fail("num_experts_per_tok %d exceeds n_routed_experts %d", c.NumExpertsPerTok, c.NRoutedExperts)
	case c.NRoutedExperts%c.NGroup != 0:
		return fail("n_routed_experts %d is not divisible by n_group %d", c.NRoutedExperts, c.NGroup)
	case c.TopKGroup > c.NGroup:
		return fail("topk_group %d exceeds n_group %d", c.TopKGroup, c.NGroup)
	case c.NGroup > 1 && c.NRoutedExperts/c.NGroup < 2:
		return fail("group-limited routing needs at least 2 experts per group")
	case c.NumExpertsPerTok > c.TopKGroup*(c.NRoutedExperts/c.NGroup):
		return fail("num_experts_per_tok %d exceeds the experts in topk_group %d groups", c.NumExpertsPerTok, c.TopKGroup)
	case c.NSharedExperts < 0:
		return fail("n_shared_experts must not be negative")
	case c.NumNextNPredictLayers < 0 || c.NumNextNPredictLayers > 1:
		return fail("num_nextn_predict_layers %d is not supported (0 or 1)", c.NumNextNPredictLayers)
	case c.PartialRotaryFactor <= 0 || c.PartialRotaryFactor > 1:
		return fail("partial_rotary_factor %g is outside (0, 1]", c.PartialRotaryFactor)
	case c.RotaryDim()%2 != 0 || c.RotaryDim() == 0:
		return fail("rotary dim head_dim*partial_rotary_factor = %g must be a positive even integer", float64(c.HeadDim)*c.PartialRotaryFactor)
	case c.RopeTheta <= 0:
		return fail("rope_theta must be positive")
	case c.RMSNormEps <= 0:
		return fail("rms_norm_eps must be positive")
	case c.HiddenAct != "silu":
		return fail("hidden_act %q is not supported (silu)", c.HiddenAct)
	case c.TieWordEmbeddings:
		return fail("tie_word_embeddings is not supported by GLM-4.5 checkpoints")
	}
	for _, id := range c.EOSTokenIDs {
		if id < 0 || id >= c.VocabSize {
			return fail("eos_token_id %d is outside the vocabulary (%d)", id, c.VocabSize)
		}
	}
	return nil
}

// RotaryDim is the number of leading head dims RoPE rotates.
func (c *Config) RotaryDim() int {
	return int(float64(c.HeadDim)*c.PartialRotaryFactor + 0.5)
}

// QDim, KVDim are the widths of the q and k/v projections.
func (c *Config) QDim() int  { return c.NumAttentionHeads * c.HeadDim }
func (c *Config) KVDim() int { return c.NumKeyValueHeads * c.HeadDim }

// LayerKind says what a decoder layer holds.
type LayerKind int

const (
	LayerDense LayerKind = iota // dense MLP
	LayerMoE                    // routed + shared experts
	LayerMTP                    // the multi-token-prediction layer (an MoE layer plus MTP projections)
)

func (k LayerKind) String() string {
	return [...]string{"dense", "moe", "mtp"}[k]
}

// NumLayers counts all decoder layers in the checkpoint, the MTP layer included.
func (c *Config) NumLayers() int { return c.NumHiddenLayers + c.NumNextNPredictLayers }

// LayerKind returns the kind of layer i in [0, NumLayers()).
func (c *Config) LayerKind(i int) LayerKind {
	switch {
	case i >= c.NumHiddenLayers:
		return LayerMTP
	case i < c.FirstKDenseReplace:
		return LayerDense
	default:
		return LayerMoE
	}
}

// HasMTP reports whether the checkpoint carries an MTP layer.
func (c *Config) HasMTP() bool { return c.NumNextNPredictLayers > 0 }

// KVBytesPerToken is the KV cache of one token over the main layers at
// elemBytes per element (2 for bf16, 1 for fp8).
func (c *Config) KVBytesPerToken(elemBytes int) int64 {
	return int64(c.NumHiddenLayers) * 2 * int64(c.KVDim()) * int64(elemBytes)
}

// JSON renders c as a Hugging Face config.json (used by presets and synth).
func (c *Config) JSON() ([]byte, error) {
	if c.raw != nil {
		return append([]byte(nil), c.raw...), nil
	}
	return c.marshal()
}

func (c *Config) marshal() ([]byte, error) {
	base, err := json.Marshal(c)
	if err != nil {
		return nil, err
	}
	var m map[string]any
	if err := json.Unmarshal(base, &m); err != nil {
		return nil, err
	}
	m["architectures"] = []string{"Glm4MoeForCausalLM"}
	m["eos_token_id"] = c.EOSTokenIDs
	if c.Quantization != nil {
		m["quantization_config"] = c.Quantization.Raw
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetIndent("", "  ")
	if err := enc.Encode(m); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Hash identifies the architecture and quantization: hosts of one cluster must agree on it.
func (c *Config) Hash() string {
	data, err := c.marshal()
	if err != nil {
		panic(fmt.Sprintf("model: marshal config: %v", err)) // plain struct: cannot fail
	}
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:])
}

// Clone returns a deep copy whose raw JSON is dropped (it no longer describes the copy).
func (c *Config) Clone() *Config {
	d := *c
	d.EOSTokenIDs = append([]int(nil), c.EOSTokenIDs...)
	d.raw = nil
	if c.Quantization != nil {
		q := *c.Quantization
		q.Ignore = append([]string(nil), q.Ignore...)
		d.Quantization = &q
	}
	return &d
}

// WithLayers returns a copy with n main layers (for synthetic checkpoints and benchmarks).
func (c *Config) WithLayers(n int) (*Config, error) {
	if n <= 0 {
		return nil, errors.New("layers must be positive")
	}
	d := c.Clone()
	d.NumHiddenLayers = n
	if d.FirstKDenseReplace > n {
		d.FirstKDenseReplace = n
	}
	if err := d.Validate(); err != nil {
		return nil, err
	}
	return d, nil
}

// WithOverrides returns the config that results from merging the top-level
// fields of the JSON object overrides into c's config.json, as vLLM's
// --hf-overrides does ('{"num_hidden_layers": 4}' for a shallow test model);
// the result is validated like any config.json.
func (c *Config) WithOverrides(overrides string) (*Config, error) {
	var over map[string]json.RawMessage
	if err := json.Unmarshal([]byte(overrides), &over); err != nil {
		return nil, fmt.Errorf("hf overrides %q: not a JSON object: %w", overrides, err)
	}
	data, err := c.JSON()
	if err != nil {
		return nil, err
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("hf overrides: %w", err)
	}
	for k, v := range over {
		m[k] = v
	}
	merged, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("hf overrides: %w", err)
	}
	d, err := ParseConfig(merged)
	if err != nil {
		return nil, fmt.Errorf("hf overrides %s: %w", overrides, err)
	}
	return d, nil
}

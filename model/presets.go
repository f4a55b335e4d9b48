package model

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"
)

// glm45Base holds what GLM-4.5, GLM-4.6 and Air share.
func glm45Base() Config {
	return Config{
		ModelType: "glm4_moe", VocabSize: 151552, NumAttentionHeads: 96, NumKeyValueHeads: 8,
		HeadDim: 128, NSharedExperts: 1, NumExpertsPerTok: 8, NGroup: 1, TopKGroup: 1,
		NormTopKProb: true, PartialRotaryFactor: 0.5, RopeTheta: 1e6, AttentionBias: true,
		RMSNormEps: 1e-5, MaxPositionEmbeddings: 131072, NumNextNPredictLayers: 1,
		HiddenAct: "silu", TorchDType: "bfloat16",
		EOSTokenIDs: []int{151329, 151336, 151338}, PadTokenID: 151329,
	}
}

// presets are the published architectures (zai-org's config.json values).
var presets = map[string]func() Config{
	"glm-4.5": func() Config {
		c := glm45Base()
		c.HiddenSize, c.IntermediateSize, c.MoEIntermediateSize = 5120, 12288, 1536
		c.NumHiddenLayers, c.FirstKDenseReplace, c.NRoutedExperts = 92, 3, 160
		c.UseQKNorm, c.RoutedScalingFactor = true, 2.5
		return c
	},
	"glm-4.6": func() Config {
		c := glm45Base()
		c.HiddenSize, c.IntermediateSize, c.MoEIntermediateSize = 5120, 12288, 1536
		c.NumHiddenLayers, c.FirstKDenseReplace, c.NRoutedExperts = 92, 3, 160
		c.UseQKNorm, c.RoutedScalingFactor = true, 2.5
		c.MaxPositionEmbeddings = 202752
		return c
	},
	"glm-4.5-air": func() Config {
		c := glm45Base()
		c.HiddenSize, c.IntermediateSize, c.MoEIntermediateSize = 4096, 10944, 1408
		c.NumHiddenLayers, c.FirstKDenseReplace, c.NRoutedExperts = 46, 1, 128
		c.UseQKNorm, c.RoutedScalingFactor = false, 1.0
		return c
	},
	// tiny is the embedded default for `make run` and tests: GLM-4.5's structure
	// (qk-norm, dense + MoE layers, shared expert, MTP) at a size a CPU runs instantly.
	// Its vocabulary is the byte-level tokenizer's (1024 ids, specials at 1003..1023).
	"tiny": func() Config {
		return Config{
			ModelType: "glm4_moe", VocabSize: 1024, HiddenSize: 128, IntermediateSize: 384,
			MoEIntermediateSize: 64, NumHiddenLayers: 4, FirstKDenseReplace: 1,
			NumAttentionHeads: 4, NumKeyValueHeads: 2, HeadDim: 32, NRoutedExperts: 16,
			NSharedExperts: 1, NumExpertsPerTok: 4, NGroup: 1, TopKGroup: 1,
			RoutedScalingFactor: 2.5, NormTopKProb: true, PartialRotaryFactor: 0.5,
			RopeTheta: 1e6, UseQKNorm: true, AttentionBias: true, RMSNormEps: 1e-5,
			MaxPositionEmbeddings: 4096, NumNextNPredictLayers: 1, HiddenAct: "silu",
			TorchDType: "bfloat16", EOSTokenIDs: []int{1003, 1010, 1012}, PadTokenID: 1003,
		}
	},
}

// PresetNames lists the built-in architectures, each also with a -fp8 variant.
func PresetNames() []string {
	var names []string
	for n := range presets {
		names = append(names, n, n+"-fp8")
	}
	sort.Strings(names)
	return names
}

// Preset returns a built-in architecture. A "-fp8" suffix gives the FP8
// checkpoint's layout: e4m3 weights with per-output-channel scales
// (compressed-tensors), lm_head and the routers kept in bf16/fp32.
func Preset(name string) (*Config, error) {
	base, fp8 := strings.CutSuffix(strings.ToLower(name), "-fp8")
	mk, ok := presets[base]
	if !ok {
		return nil, fmt.Errorf("unknown preset %q (known: %s)", name, strings.Join(PresetNames(), ", "))
	}
	c := mk()
	if fp8 {
		c.Quantization = FP8PerChannel()
	}
	if err := c.Validate(); err != nil {
		panic(fmt.Sprintf("model: preset %s invalid: %v", name, err)) // a bug in the table above
	}
	return &c, nil
}

// FP8PerChannel is the quantization_config of zai-org's FP8 checkpoints
// (compressed-tensors, e4m3, one scale per output channel, dynamic per-token activations).
func FP8PerChannel() *Quantization {
	raw := map[string]any{
		"quant_method": "compressed-tensors",
		"format":       "float-quantized",
		"config_groups": map[string]any{
			"group_0": map[string]any{
				"targets": []string{"Linear"},
				"weights": map[string]any{"num_bits": 8, "type": "float", "strategy": "channel",
					"symmetric": true, "dynamic": false},
				"input_activations": map[string]any{"num_bits": 8, "type": "float", "strategy": "token",
					"symmetric": true, "dynamic": true},
			},
		},
		"ignore": []string{"lm_head"},
	}
	data, _ := json.Marshal(raw)
	q, err := parseQuantization(data)
	if err != nil {
		panic(err)
	}
	return q
}

// FP8Block is a DeepSeek-style quantization_config: e4m3 weights with one
// scale (weight_scale_inv) per 128×128 block.
func FP8Block() *Quantization {
	data := []byte(`{"quant_method":"fp8","fmt":"e4m3","activation_scheme":"dynamic","weight_block_size":[128,128],"modules_to_not_convert":["lm_head"]}`)
	q, err := parseQuantization(data)
	if err != nil {
		panic(err)
	}
	return q
}

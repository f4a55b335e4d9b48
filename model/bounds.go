package model

import "fmt"

// Upper bounds on config.json fields. Every command sizes tensor lists,
// parameter counts and buffers from these fields, so a hostile or corrupt
// config must be refused before anything is allocated from it. The limits
// are far above any GLM-4.5-class model (GLM-4.5: 92 layers, 160 experts,
// hidden 5120, vocabulary 151552) and far below what would exhaust memory.
const (
	// MaxConfigBytes bounds config.json itself (a real one is a few KB).
	MaxConfigBytes = 1 << 20
	maxVocab       = 1 << 22
	maxHidden      = 1 << 16
	maxIntermed    = 1 << 20
	maxLayers      = 1024
	maxHeads       = 1024
	maxHeadDim     = 1024
	maxExperts     = 4096
	maxShared      = 64
	maxPositions   = 1 << 24
	maxEOSTokens   = 1024
	// maxTensors bounds the checkpoint's tensor list (GLM-4.5-FP8: ~90k).
	maxTensors = 1 << 20
	// maxParams bounds the parameter count (GLM-4.5: 3.6e11).
	maxParams = 1e13
)

// checkBounds reports the first field outside its bound. It runs before any
// derived quantity (tensor list, parameter count) is computed, and computes
// its own products in float64 so no bound check can overflow.
func (c *Config) checkBounds() error {
	fields := []struct {
		name string
		v    int
		max  int
	}{
		{"vocab_size", c.VocabSize, maxVocab}, {"hidden_size", c.HiddenSize, maxHidden},
		{"intermediate_size", c.IntermediateSize, maxIntermed}, {"moe_intermediate_size", c.MoEIntermediateSize, maxIntermed},
		{"num_hidden_layers", c.NumHiddenLayers, maxLayers}, {"num_attention_heads", c.NumAttentionHeads, maxHeads},
		{"num_key_value_heads", c.NumKeyValueHeads, maxHeads}, {"head_dim", c.HeadDim, maxHeadDim},
		{"n_routed_experts", c.NRoutedExperts, maxExperts}, {"num_experts_per_tok", c.NumExpertsPerTok, maxExperts},
		{"n_group", c.NGroup, maxExperts}, {"topk_group", c.TopKGroup, maxExperts},
		{"max_position_embeddings", c.MaxPositionEmbeddings, maxPositions},
	}
	for _, f := range fields {
		if f.v <= 0 || f.v > f.max {
			return fmt.Errorf("%s must be in [1, %d], got %d", f.name, f.max, f.v)
		}
	}
	if c.NSharedExperts < 0 || c.NSharedExperts > maxShared {
		return fmt.Errorf("n_shared_experts must be in [0, %d], got %d", maxShared, c.NSharedExperts)
	}
	if len(c.EOSTokenIDs) > maxEOSTokens {
		return fmt.Errorf("eos_token_id lists %d ids (at most %d)", len(c.EOSTokenIDs), maxEOSTokens)
	}
	if n := c.tensorCountBound(); n > maxTensors {
		return fmt.Errorf("%d layers × %d experts make %.0f tensors (at most %d)", c.NumHiddenLayers, c.NRoutedExperts, n, maxTensors)
	}
	if p := c.paramBound(); p > maxParams {
		return fmt.Errorf("the shapes imply %.3g parameters (at most %.0g)", p, maxParams)
	}
	return nil
}

// tensorCountBound is an upper bound on len(c.Tensors()): every linear with
// its scale and bias, every layer with routed experts, MTP layer included.
func (c *Config) tensorCountBound() float64 {
	layers := float64(c.NumHiddenLayers + max(c.NumNextNPredictLayers, 0))
	perLayer := 3*2*float64(c.NRoutedExperts) + 32
	return layers*perLayer + 8
}

// paramBound is an upper bound on the parameter count.
func (c *Config) paramBound() float64 {
	h := float64(c.HiddenSize)
	q := float64(c.NumAttentionHeads) * float64(c.HeadDim)
	kv := float64(c.NumKeyValueHeads) * float64(c.HeadDim)
	attn := h*(2*q+2*kv) + 4*(q+kv)
	dense := 3 * h * float64(c.IntermediateSize)
	moe := 3 * h * float64(c.MoEIntermediateSize) * float64(c.NRoutedExperts+max(c.NSharedExperts, 0))
	layers := float64(c.NumHiddenLayers + max(c.NumNextNPredictLayers, 0))
	embed := 4 * float64(c.VocabSize) * h // embeddings, lm_head and the MTP layer's copies
	return layers*(attn+max(dense, moe)+3*h*h) + embed
}

// CheckHostMemory refuses a model whose weights, held as f32 by the CPU
// engine, exceed the host memory available: a config within every bound
// may still describe more weights than this host holds, and generating
// dummy weights for it would end in the OOM killer.
func CheckHostMemory(c *Config, available int64) error {
	need := float64(c.Params().Total) * 4
	if need > float64(available) {
		return fmt.Errorf("the model's weights need %.1f GiB as f32 on the CPU, the host has %.1f GiB available: use fewer layers (--hf-overrides '{\"num_hidden_layers\": N}') or a GPU",
			need/(1<<30), float64(available)/(1<<30))
	}
	return nil
}

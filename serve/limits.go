package serve

import "fmt"

// CheckMaxModelLen checks --max-model-len against the model's
// max_position_embeddings, as vLLM does at start: a longer context runs
// positions the model was never trained on, and its prompts take minutes of
// prefill, so it is refused unless allowLong says to run it anyway; then the
// returned warning says what that means. requested 0 (the model's own
// length) is always fine.
func CheckMaxModelLen(requested, maxPositions int, allowLong bool) (warning string, err error) {
	if requested <= maxPositions {
		return "", nil
	}
	if !allowLong {
		return "", fmt.Errorf("--max-model-len %d exceeds the model's max_position_embeddings %d (config.json): "+
			"lower --max-model-len to at most %d, or pass --allow-long-max-model-len to run past the trained context "+
			"(outputs may be wrong; vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN)", requested, maxPositions, maxPositions)
	}
	return fmt.Sprintf("--max-model-len %d exceeds the model's max_position_embeddings %d: "+
		"positions past %d were never trained and outputs may be wrong (--allow-long-max-model-len)", requested, maxPositions, maxPositions), nil
}

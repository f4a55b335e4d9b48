package model

import (
	"fmt"
	"io"
	"sort"
	"text/tabwriter"
)

// Summary is what `glmtopo model inspect` reports about an architecture.
type Summary struct {
	ModelType           string          `json:"model_type"`
	Layers              int             `json:"num_hidden_layers"`
	DenseLayers         int             `json:"dense_layers"`
	MoELayers           int             `json:"moe_layers"`
	Hidden              int             `json:"hidden_size"`
	Heads               int             `json:"num_attention_heads"`
	KVHeads             int             `json:"num_key_value_heads"`
	HeadDim             int             `json:"head_dim"`
	QKNorm              bool            `json:"use_qk_norm"`
	Experts             int             `json:"n_routed_experts"`
	ExpertsPerToken     int             `json:"num_experts_per_tok"`
	SharedExperts       int             `json:"n_shared_experts"`
	Vocab               int             `json:"vocab_size"`
	MaxPositions        int             `json:"max_position_embeddings"`
	HasMTP              bool            `json:"has_mtp"`
	Quantization        string          `json:"quantization"`
	Params              ParamCounts     `json:"params"`
	BytesByDType        map[DType]int64 `json:"bytes_by_dtype"`
	TotalBytes          int64           `json:"total_bytes"`
	KVBytesPerTokenBF16 int64           `json:"kv_bytes_per_token_bf16"`
	KVBytesPerTokenFP8  int64           `json:"kv_bytes_per_token_fp8"`
	ConfigHash          string          `json:"config_hash"`
}

// Summarize describes c.
func Summarize(c *Config) Summary {
	s := Summary{
		ModelType: c.ModelType, Layers: c.NumHiddenLayers, DenseLayers: c.FirstKDenseReplace,
		MoELayers: c.NumHiddenLayers - c.FirstKDenseReplace, Hidden: c.HiddenSize,
		Heads: c.NumAttentionHeads, KVHeads: c.NumKeyValueHeads, HeadDim: c.HeadDim, QKNorm: c.UseQKNorm,
		Experts: c.NRoutedExperts, ExpertsPerToken: c.NumExpertsPerTok, SharedExperts: c.NSharedExperts,
		Vocab: c.VocabSize, MaxPositions: c.MaxPositionEmbeddings, HasMTP: c.HasMTP(),
		Quantization: "none (bf16)", Params: c.Params(), BytesByDType: c.BytesByDType(),
		KVBytesPerTokenBF16: c.KVBytesPerToken(2), KVBytesPerTokenFP8: c.KVBytesPerToken(1), ConfigHash: c.Hash(),
	}
	if c.Quantization != nil {
		s.Quantization = fmt.Sprintf("%s (%s)", c.Quantization.Scheme, c.Quantization.Method)
	}
	for _, b := range s.BytesByDType {
		s.TotalBytes += b
	}
	return s
}

// WriteTable prints s for people.
func (s Summary) WriteTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 2, 2, ' ', 0)
	p := s.Params
	rows := [][2]string{
		{"architecture", fmt.Sprintf("%s, %d layers (%d dense, %d MoE), hidden %d", s.ModelType, s.Layers, s.DenseLayers, s.MoELayers, s.Hidden)},
		{"attention", fmt.Sprintf("%d heads / %d kv heads × %d, qk-norm %v", s.Heads, s.KVHeads, s.HeadDim, s.QKNorm)},
		{"experts", fmt.Sprintf("%d routed (top-%d) + %d shared", s.Experts, s.ExpertsPerToken, s.SharedExperts)},
		{"vocabulary", fmt.Sprintf("%d tokens, context %d", s.Vocab, s.MaxPositions)},
		{"parameters", fmt.Sprintf("%s total (%s without MTP), %s active per token (%s without embeddings)",
			HumanCount(p.Total), HumanCount(p.Main), HumanCount(p.Active), HumanCount(p.ActiveNonEmbedding))},
		{"MTP layer", fmt.Sprintf("%v (%s parameters)", s.HasMTP, HumanCount(p.MTP))},
		{"quantization", s.Quantization},
	}
	var dts []string
	for d := range s.BytesByDType {
		dts = append(dts, string(d))
	}
	sort.Strings(dts)
	for _, d := range dts {
		rows = append(rows, [2]string{"bytes " + d, HumanBytes(s.BytesByDType[DType(d)])})
	}
	rows = append(rows,
		[2]string{"bytes total", HumanBytes(s.TotalBytes)},
		[2]string{"KV cache / token", fmt.Sprintf("%s bf16, %s fp8", HumanBytes(s.KVBytesPerTokenBF16), HumanBytes(s.KVBytesPerTokenFP8))},
		[2]string{"config hash", s.ConfigHash[:16]})
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\n", r[0], r[1])
	}
	return tw.Flush()
}

// HumanCount prints 355.1B, 12.0M, ...
func HumanCount(n int64) string {
	switch {
	case n >= 1e9:
		return fmt.Sprintf("%.1fB", float64(n)/1e9)
	case n >= 1e6:
		return fmt.Sprintf("%.1fM", float64(n)/1e6)
	case n >= 1e3:
		return fmt.Sprintf("%.1fK", float64(n)/1e3)
	}
	return fmt.Sprint(n)
}

// HumanBytes prints binary units: 368 KiB, 667.5 GiB.
func HumanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	v := float64(n) / float64(div)
	if v == float64(int64(v)) {
		return fmt.Sprintf("%d %ciB", int64(v), "KMGTPE"[exp])
	}
	return fmt.Sprintf("%.1f %ciB", v, "KMGTPE"[exp])
}

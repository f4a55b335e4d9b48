package model

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
)

// QuantScheme is how FP8 weight scales are laid out.
type QuantScheme int

const (
	QuantNone       QuantScheme = iota
	QuantPerChannel             // <linear>.weight_scale, shape [out, 1]
	QuantBlock                  // <linear>.weight_scale_inv, shape [ceil(out/B0), ceil(in/B1)]
)

func (s QuantScheme) String() string {
	return [...]string{"none", "fp8-per-channel", "fp8-block"}[s]
}

// Quantization is a checkpoint's quantization_config reduced to what loading needs.
type Quantization struct {
	Method    string      // "compressed-tensors" or "fp8"
	Scheme    QuantScheme // per channel or 128×128 blocks
	BlockSize [2]int      // for QuantBlock
	// Ignore lists modules kept unquantized: exact names, "re:" regexes, or
	// trailing-name matches ("lm_head" matches "lm_head" only).
	Ignore []string
	Raw    json.RawMessage
	ignore []*regexp.Regexp
	// exact and lastName index Ignore's plain entries, so Quantized costs the
	// same for a list of ten entries or ten thousand.
	exact, lastName map[string]bool
}

// Bounds on quantization_config: a real list names a few modules per layer.
const (
	maxIgnoreEntries = 1 << 16
	maxIgnoreRegexps = 64
)

func parseQuantization(data []byte) (*Quantization, error) {
	var r struct {
		QuantMethod  string `json:"quant_method"`
		Format       string `json:"format"`
		ConfigGroups map[string]struct {
			Targets []string `json:"targets"`
			Weights *struct {
				NumBits        int    `json:"num_bits"`
				Type           string `json:"type"`
				Strategy       string `json:"strategy"`
				BlockStructure []int  `json:"block_structure"`
			} `json:"weights"`
		} `json:"config_groups"`
		Ignore              []string `json:"ignore"`
		Fmt                 string   `json:"fmt"`
		WeightBlockSize     []int    `json:"weight_block_size"`
		ModulesToNotConvert []string `json:"modules_to_not_convert"`
	}
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, fmt.Errorf("quantization_config: %w", err)
	}
	q := &Quantization{Method: r.QuantMethod, Raw: append(json.RawMessage(nil), data...)}
	switch r.QuantMethod {
	case "compressed-tensors":
		if len(r.ConfigGroups) != 1 {
			return nil, fmt.Errorf("quantization_config: compressed-tensors with %d config groups is not supported (1)", len(r.ConfigGroups))
		}
		for name, g := range r.ConfigGroups {
			w := g.Weights
			if w == nil || w.NumBits != 8 || w.Type != "float" {
				return nil, fmt.Errorf("quantization_config: group %s: only 8-bit float weights are supported", name)
			}
			switch w.Strategy {
			case "channel":
				q.Scheme = QuantPerChannel
			case "block":
				q.Scheme = QuantBlock
				q.BlockSize = [2]int{128, 128}
				if len(w.BlockStructure) == 2 {
					q.BlockSize = [2]int{w.BlockStructure[0], w.BlockStructure[1]}
				}
			default:
				return nil, fmt.Errorf("quantization_config: group %s: weight strategy %q is not supported (channel, block)", name, w.Strategy)
			}
		}
		q.Ignore = r.Ignore
	case "fp8":
		if r.Fmt != "" && r.Fmt != "e4m3" {
			return nil, fmt.Errorf("quantization_config: fp8 format %q is not supported (e4m3)", r.Fmt)
		}
		if len(r.WeightBlockSize) != 2 {
			return nil, fmt.Errorf("quantization_config: fp8 without weight_block_size [128,128] is not supported")
		}
		q.Scheme = QuantBlock
		q.BlockSize = [2]int{r.WeightBlockSize[0], r.WeightBlockSize[1]}
		q.Ignore = r.ModulesToNotConvert
	default:
		return nil, fmt.Errorf("quantization_config: quant_method %q is not supported (compressed-tensors, fp8)", r.QuantMethod)
	}
	if q.Scheme == QuantBlock && (q.BlockSize[0] <= 0 || q.BlockSize[1] <= 0) {
		return nil, fmt.Errorf("quantization_config: bad block size %v", q.BlockSize)
	}
	if len(q.Ignore) > maxIgnoreEntries {
		return nil, fmt.Errorf("quantization_config: %d ignored modules (at most %d)", len(q.Ignore), maxIgnoreEntries)
	}
	q.exact, q.lastName = map[string]bool{}, map[string]bool{}
	for _, pat := range q.Ignore {
		if !strings.HasPrefix(pat, "re:") {
			q.exact[pat] = true
			if !strings.Contains(pat, ".") {
				q.lastName[pat] = true
			}
		}
	}
	for _, pat := range q.Ignore {
		if re, ok := strings.CutPrefix(pat, "re:"); ok {
			if len(q.ignore) == maxIgnoreRegexps {
				return nil, fmt.Errorf("quantization_config: more than %d ignore regexps", maxIgnoreRegexps)
			}
			rx, err := regexp.Compile("^(?:" + re + ")$")
			if err != nil {
				return nil, fmt.Errorf("quantization_config: ignore pattern %q: %w", pat, err)
			}
			q.ignore = append(q.ignore, rx)
		}
	}
	return q, nil
}

// Quantized reports whether the linear module (a name without ".weight")
// is stored in FP8. Only nn.Linear modules are ever quantized: GLM-4.5's
// router (mlp.gate), embeddings and norms are not Linear.
func (q *Quantization) Quantized(module string) bool {
	if q == nil || q.Scheme == QuantNone {
		return false
	}
	last := module[strings.LastIndexByte(module, '.')+1:]
	if q.exact[module] || q.lastName[last] && last != module {
		return false
	}
	for _, rx := range q.ignore {
		if rx.MatchString(module) {
			return false
		}
	}
	return true
}

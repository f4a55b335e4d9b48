package parallel

// MTP speculative decoding: the configuration and its flags.
//
// With speculation on, the head drafts N tokens per running sequence with
// the model's own MTP layer (applied recursively for N > 1, as vLLM does)
// and the next step verifies them: the main model scores the sequence's
// last token plus its N drafts (N+1 rows), the sampler keeps the longest
// accepted prefix plus one token of its own, and the KV entries of rejected
// positions (main layers and MTP layer) are rolled back by setting the
// sequence's lengths, since attention reads only positions up to its own.
// spec_step.go runs the steps, spec_pipe.go runs them with micro-batches in
// a pipeline's ring, spec_sample.go decides acceptance, and spec_engine.go
// holds the forwards that keep hidden rows for the MTP layer.

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// MaxSpeculativeTokens bounds num_speculative_tokens (the recipe uses 1;
// acceptance past the fourth recursive draft rarely pays for its rows).
const MaxSpeculativeTokens = 4

// SpecConfig is vLLM's --speculative-config for MTP. The zero value is off.
type SpecConfig struct {
	Method               string `json:"method"`
	NumSpeculativeTokens int    `json:"num_speculative_tokens"`
}

// Enabled reports whether the scheduler drafts tokens.
func (c SpecConfig) Enabled() bool { return c.NumSpeculativeTokens > 0 }

// Validate checks the method and the number of drafts.
func (c SpecConfig) Validate() error {
	if c == (SpecConfig{}) {
		return nil
	}
	if c.Method != "mtp" {
		return fmt.Errorf("speculative config: method %q: glmtopo drafts with the model's MTP layer: want \"mtp\"", c.Method)
	}
	if c.NumSpeculativeTokens < 1 || c.NumSpeculativeTokens > MaxSpeculativeTokens {
		return fmt.Errorf("speculative config: num_speculative_tokens %d is outside [1, %d]", c.NumSpeculativeTokens, MaxSpeculativeTokens)
	}
	return nil
}

// CheckEngine says whether e can run c: speculation needs the MTP layer.
func (c SpecConfig) CheckEngine(e *Engine) error {
	if err := c.Validate(); err != nil {
		return err
	}
	if c.Enabled() && e.W.MTP == nil {
		return fmt.Errorf("speculative config: method mtp needs the model's MTP layer (num_nextn_predict_layers is %d)", e.Cfg.NumNextNPredictLayers)
	}
	return nil
}

// String is the JSON form vLLM logs ("off" for the zero value).
func (c SpecConfig) String() string {
	if c == (SpecConfig{}) {
		return "off"
	}
	b, _ := json.Marshal(c)
	return string(b)
}

// ParseSpecConfig reads --speculative-config's JSON object. Unknown keys are
// an error: a vLLM option glmtopo does not implement must not pass silently.
func ParseSpecConfig(s string) (SpecConfig, error) {
	var c SpecConfig
	dec := json.NewDecoder(bytes.NewReader([]byte(s)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return SpecConfig{}, fmt.Errorf("--speculative-config %q: %w (want e.g. '{\"method\":\"mtp\",\"num_speculative_tokens\":1}')", s, err)
	}
	if dec.More() {
		return SpecConfig{}, fmt.Errorf("--speculative-config %q: trailing data after the JSON object", s)
	}
	return c, c.Validate()
}

// Flag names: the JSON form and the recipe's dotted form.
const (
	specFlag       = "speculative-config"
	specMethodFlag = "speculative-config.method"
	specTokensFlag = "speculative-config.num_speculative_tokens"
)

// SpecFlags are the speculative flags of one command line.
type SpecFlags struct {
	json, method string
	tokens       int
	tokensSet    bool
}

// AddSpecFlags registers --speculative-config and its dotted forms on fs;
// Config reads them after fs.Parse.
func AddSpecFlags(fs *flag.FlagSet) *SpecFlags {
	f := &SpecFlags{}
	fs.StringVar(&f.json, specFlag, "", `MTP speculative decoding as vLLM's, e.g. '{"method":"mtp","num_speculative_tokens":1}'`)
	fs.StringVar(&f.method, specMethodFlag, "", "speculative decoding method (mtp); the dotted form of --speculative-config")
	fs.Func(specTokensFlag, fmt.Sprintf("draft tokens per step, 1..%d; the dotted form of --speculative-config", MaxSpeculativeTokens), func(s string) error {
		n, err := strconv.Atoi(s)
		if err != nil {
			return fmt.Errorf("%q is not an integer", s)
		}
		f.tokens, f.tokensSet = n, true
		return nil
	})
	return f
}

// Config merges the flags: the JSON object first, the dotted fields over it.
func (f *SpecFlags) Config() (SpecConfig, error) {
	var c SpecConfig
	if f.json != "" {
		var err error
		if c, err = ParseSpecConfig(f.json); err != nil {
			return SpecConfig{}, err
		}
	}
	if f.method != "" {
		c.Method = f.method
	}
	if f.tokensSet {
		c.NumSpeculativeTokens = f.tokens
	}
	switch {
	case c.Method != "" && c.NumSpeculativeTokens == 0:
		return SpecConfig{}, fmt.Errorf("speculative config: method %q without num_speculative_tokens (--%s N)", c.Method, specTokensFlag)
	case c.Method == "" && c.NumSpeculativeTokens != 0:
		return SpecConfig{}, fmt.Errorf("speculative config: num_speculative_tokens %d without a method (--%s mtp)", c.NumSpeculativeTokens, specMethodFlag)
	}
	return c, c.Validate()
}

// SplitSpecArgs takes the speculative flags out of args, for commands whose
// flag set belongs to another package (node): it returns the other
// arguments, in order, and the configuration.
func SplitSpecArgs(args []string) ([]string, SpecConfig, error) {
	fs := flag.NewFlagSet("speculative-config", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	f := AddSpecFlags(fs)
	var rest, ours []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			rest = append(rest, args[i:]...)
			break
		}
		name, _, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "-") || (name != specFlag && name != specMethodFlag && name != specTokensFlag) {
			rest = append(rest, a)
			continue
		}
		ours = append(ours, a)
		if !hasValue {
			if i+1 == len(args) {
				return nil, SpecConfig{}, fmt.Errorf("flag needs an argument: %s", a)
			}
			i++
			ours = append(ours, args[i])
		}
	}
	if err := fs.Parse(ours); err != nil {
		return nil, SpecConfig{}, err
	}
	c, err := f.Config()
	return rest, c, err
}

// errNoMTP is a step's error when speculation runs on an engine without the
// MTP layer (CheckEngine catches it at start).
var errNoMTP = errors.New("speculative decoding: the engine has no MTP layer")

// VerifyRows is the rows of a verify step of seqs sequences (seqs without
// speculation): the decode-graph width that covers them.
func (c SpecConfig) VerifyRows(seqs int) int { return seqs * (1 + c.NumSpeculativeTokens) }

package serving

import (
	"bufio"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"strings"
)

// Request is one prompt to send.
type Request struct {
	Prompt    string
	PromptLen int // prompt tokens as counted locally (exact with a tokenizer, else estimated)
	OutputLen int // max_tokens / max_completion_tokens
}

// Dataset is the sampled prompts and how their lengths were counted.
type Dataset struct {
	Requests []Request
	// Exact is true when PromptLen comes from the server's tokenizer.
	Exact bool
	// TokenMismatch is the total (re-encoded − target) token count left after vLLM's
	// decode/re-encode adjustment; 0 means every random prompt is token-exact.
	TokenMismatch int
}

func newRNG(seed int64, stream uint64) *rand.Rand {
	return rand.New(rand.NewPCG(uint64(seed), stream))
}

// randomLengths draws per-request input and output lengths uniformly from
// [⌊L(1−r)⌋, ⌈L(1+r)⌉] like vLLM (output at least 1).
func randomLengths(rng *rand.Rand, n, inputLen, outputLen int, ratio float64) (in, out []int) {
	inLo := int(math.Floor(float64(inputLen) * (1 - ratio)))
	inHi := int(math.Ceil(float64(inputLen) * (1 + ratio)))
	outLo := max(int(math.Floor(float64(outputLen)*(1-ratio))), 1)
	outHi := max(int(math.Ceil(float64(outputLen)*(1+ratio))), 1)
	in, out = make([]int, n), make([]int, n)
	for i := range n {
		in[i] = inLo + rng.IntN(inHi-inLo+1)
	}
	for i := range n {
		out[i] = outLo + rng.IntN(outHi-outLo+1)
	}
	return in, out
}

// SampleRandomTokens builds vLLM's random dataset with the server's tokenizer: a shared random
// prefix, then a run of consecutive allowed token ids starting at a random offset, decoded to
// text and re-encoded (up to 10 times, padding or truncating) until it is exactly the target
// length.
func SampleRandomTokens(c *Config, tok Tokenizer) (Dataset, error) {
	rng := newRNG(c.Seed, 1)
	vocab := tok.VocabSize()
	sc, _ := tok.(specialChecker)
	// Unlike vLLM, draw only tokens that survive a decode/encode round trip on their own:
	// byte fragments of multi-byte characters decode to U+FFFD and re-encode to other tokens,
	// which is what keeps vLLM's prompts from converging to the exact length.
	allowed := make([]int, 0, vocab)
	one := make([]int, 1)
	for id := range vocab {
		if sc != nil && sc.IsSpecial(id) {
			continue
		}
		one[0] = id
		if back := tok.Encode(tok.Decode(one)); len(back) == 1 && back[0] == id {
			allowed = append(allowed, id)
		}
	}
	if len(allowed) == 0 {
		return Dataset{}, fmt.Errorf("tokenizer has no non-special tokens")
	}
	inLens, outLens := randomLengths(rng, c.NumPrompts, c.RandomInputLen, c.RandomOutputLen, c.RandomRangeRatio)
	prefix := make([]int, c.RandomPrefixLen)
	for i := range prefix {
		prefix[i] = allowed[rng.IntN(len(allowed))]
	}
	ds := Dataset{Requests: make([]Request, c.NumPrompts), Exact: true}
	for i := range c.NumPrompts {
		offset := rng.IntN(vocab)
		seq := append(make([]int, 0, len(prefix)+inLens[i]), prefix...)
		for j := range inLens[i] {
			seq = append(seq, allowed[(offset+i+j)%len(allowed)])
		}
		target := len(prefix) + inLens[i]
		prompt, ids := fitToLength(tok, seq, target, allowed, rng)
		ds.TokenMismatch += len(ids) - target
		ds.Requests[i] = Request{Prompt: prompt, PromptLen: len(ids), OutputLen: outLens[i]}
	}
	return ds, nil
}

// fitTries bounds the decode/re-encode loop (vLLM stops after 10).
const fitTries = 10

func fitToLength(tok Tokenizer, seq []int, target int, allowed []int, rng *rand.Rand) (string, []int) {
	for try := 0; ; try++ {
		prompt := tok.Decode(seq)
		seq = tok.Encode(prompt)
		if try == fitTries || len(seq) == target {
			return prompt, seq
		}
		if len(seq) > target {
			seq = seq[:target]
			continue
		}
		for len(seq) < target {
			seq = append(seq, allowed[rng.IntN(len(allowed))])
		}
	}
}

// textWords are words that are one token (with their leading space) in GLM-4.5's, Llama 3's
// and GPT-4's byte-level BPEs, so "N words" is close to N tokens before calibration.
var textWords = strings.Fields(`the of and to in is that for it as was with be by on not he this are or his
from at which but have an had they you were their one all we can her has there been if more when will
would who so no time people year way day man thing world life hand part child eye woman place work week
case point number group problem fact water house night city story money power game end member law car
name team food market class book light air film body family door room home field music history
party result change morning reason research girl guy moment paper student level office side health person
art war boy age idea area price month minute line friend father mother news report table road plan`)

// SampleRandomText builds random prompts without the server's tokenizer: words that are single
// tokens in common BPEs, tokensPerWord (measured against the server, 1 before calibration)
// scaling the word count toward the target token length.
func SampleRandomText(c *Config, tokensPerWord float64) Dataset {
	rng := newRNG(c.Seed, 1)
	inLens, outLens := randomLengths(rng, c.NumPrompts, c.RandomInputLen, c.RandomOutputLen, c.RandomRangeRatio)
	words := func(n int) int { return max(int(math.Round(float64(n)/tokensPerWord)), 0) }
	var prefix strings.Builder
	for range words(c.RandomPrefixLen) {
		prefix.WriteString(" ")
		prefix.WriteString(textWords[rng.IntN(len(textWords))])
	}
	ds := Dataset{Requests: make([]Request, c.NumPrompts)}
	for i := range c.NumPrompts {
		var b strings.Builder
		b.WriteString(prefix.String())
		// Independent random words: prompts differ from their first word on, so nothing but
		// the configured prefix can hit a prefix cache.
		for range words(inLens[i]) {
			b.WriteString(" ")
			b.WriteString(textWords[rng.IntN(len(textWords))])
		}
		ds.Requests[i] = Request{Prompt: b.String(), PromptLen: c.RandomPrefixLen + inLens[i], OutputLen: outLens[i]}
	}
	return ds
}

// countTokens counts with the tokenizer, else estimates four bytes per token.
func countTokens(tok Tokenizer, s string) int {
	if tok != nil {
		return len(tok.Encode(s))
	}
	return max(int(math.Round(float64(len(s))/4)), 1)
}

// validSequence is vLLM's ShareGPT filter.
func validSequence(promptLen, outputLen int, skipMinOutput bool) bool {
	return promptLen >= 4 && (skipMinOutput || outputLen >= 4) && promptLen <= 1024 && promptLen+outputLen <= 2048
}

// SampleShareGPT reads a ShareGPT JSON file: the first turn is the prompt, the second's length
// the output length unless c.SharegptOutputLen is set.
func SampleShareGPT(c *Config, tok Tokenizer) (Dataset, error) {
	raw, err := os.ReadFile(c.DatasetPath)
	if err != nil {
		return Dataset{}, fmt.Errorf("sharegpt: %w", err)
	}
	var entries []struct {
		Conversations []struct {
			Value string `json:"value"`
		} `json:"conversations"`
	}
	if err := json.Unmarshal(raw, &entries); err != nil {
		return Dataset{}, fmt.Errorf("sharegpt %s: %w", c.DatasetPath, err)
	}
	rng := newRNG(c.Seed, 2)
	rng.Shuffle(len(entries), func(i, j int) { entries[i], entries[j] = entries[j], entries[i] })
	ds := Dataset{Exact: tok != nil}
	for _, e := range entries {
		if len(ds.Requests) >= c.NumPrompts {
			break
		}
		if len(e.Conversations) < 2 {
			continue
		}
		prompt := e.Conversations[0].Value
		pl := countTokens(tok, prompt)
		ol := c.SharegptOutputLen
		if ol == 0 {
			ol = countTokens(tok, e.Conversations[1].Value)
		}
		if !validSequence(pl, ol, c.SharegptOutputLen != 0) {
			continue
		}
		ds.Requests = append(ds.Requests, Request{Prompt: prompt, PromptLen: pl, OutputLen: ol})
	}
	return oversample(ds, c.NumPrompts, rng, c.DatasetPath)
}

// SampleCustom reads vLLM's custom JSONL format: one {"prompt": "..."} per line.
func SampleCustom(c *Config, tok Tokenizer) (Dataset, error) {
	f, err := os.Open(c.DatasetPath)
	if err != nil {
		return Dataset{}, fmt.Errorf("custom dataset: %w", err)
	}
	defer f.Close()
	var prompts []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for line := 1; sc.Scan(); line++ {
		t := strings.TrimSpace(sc.Text())
		if t == "" {
			continue
		}
		var row struct {
			Prompt *string `json:"prompt"`
		}
		if err := json.Unmarshal([]byte(t), &row); err != nil {
			return Dataset{}, fmt.Errorf("%s:%d: %w", c.DatasetPath, line, err)
		}
		if row.Prompt == nil {
			return Dataset{}, fmt.Errorf("%s:%d: no \"prompt\" field", c.DatasetPath, line)
		}
		prompts = append(prompts, *row.Prompt)
	}
	if err := sc.Err(); err != nil {
		return Dataset{}, fmt.Errorf("read %s: %w", c.DatasetPath, err)
	}
	rng := newRNG(c.Seed, 3)
	rng.Shuffle(len(prompts), func(i, j int) { prompts[i], prompts[j] = prompts[j], prompts[i] })
	ds := Dataset{Exact: tok != nil}
	for _, p := range prompts {
		if len(ds.Requests) >= c.NumPrompts {
			break
		}
		ds.Requests = append(ds.Requests, Request{Prompt: p, PromptLen: countTokens(tok, p), OutputLen: c.CustomOutputLen})
	}
	return oversample(ds, c.NumPrompts, rng, c.DatasetPath)
}

// oversample repeats random samples until there are n, as vLLM does.
func oversample(ds Dataset, n int, rng *rand.Rand, path string) (Dataset, error) {
	if len(ds.Requests) == 0 {
		return ds, fmt.Errorf("%s: no usable prompts", path)
	}
	for len(ds.Requests) < n {
		ds.Requests = append(ds.Requests, ds.Requests[rng.IntN(len(ds.Requests))])
	}
	return ds, nil
}

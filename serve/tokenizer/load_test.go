package tokenizer

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// fixtureMap returns the fixture tokenizer.json as a generic map to mutate.
func fixtureMap(t *testing.T) map[string]any {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(fixtureDir, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestFromJSONErrors(t *testing.T) {
	model := func(m map[string]any) map[string]any { return m["model"].(map[string]any) }
	split := func(m map[string]any) map[string]any {
		return m["pre_tokenizer"].(map[string]any)["pretokenizers"].([]any)[0].(map[string]any)
	}
	tests := []struct {
		name   string
		mutate func(m map[string]any)
		raw    string // used instead of the mutated fixture when set
		want   string
	}{
		{name: "not JSON", raw: "{", want: "parse tokenizer.json"},
		{name: "empty object", raw: "{}", want: "no model"},
		{name: "wrong field type", raw: `{"model": []}`, want: "parse tokenizer.json"},
		{name: "WordPiece model", mutate: func(m map[string]any) { model(m)["type"] = "WordPiece" }, want: `unsupported model type "WordPiece"`},
		{name: "Unigram model", mutate: func(m map[string]any) { model(m)["type"] = "Unigram" }, want: "unsupported model type"},
		{name: "empty vocab", mutate: func(m map[string]any) { model(m)["vocab"] = map[string]any{} }, want: "empty vocab"},
		{name: "dropout", mutate: func(m map[string]any) { model(m)["dropout"] = 0.1 }, want: "dropout"},
		{name: "subword prefix", mutate: func(m map[string]any) { model(m)["continuing_subword_prefix"] = "##" }, want: "continuing_subword_prefix"},
		{name: "merge of unknown token", mutate: func(m map[string]any) {
			model(m)["merges"] = []any{[]any{"Ġ", "nope"}}
		}, want: "missing from the vocab"},
		{name: "merge result missing", mutate: func(m map[string]any) {
			model(m)["merges"] = []any{[]any{"x", "q"}}
		}, want: `makes "xq"`},
		{name: "merge with three parts", mutate: func(m map[string]any) { model(m)["merges"] = []any{"a b c"} }, want: "two tokens"},
		{name: "merge not a pair", mutate: func(m map[string]any) { model(m)["merges"] = []any{[]any{"a"}} }, want: "pair of token strings"},
		{name: "merges not a list", mutate: func(m map[string]any) { model(m)["merges"] = 5 }, want: "parse merges"},
		{name: "unknown unk", mutate: func(m map[string]any) { model(m)["unk_token"] = "<unk>" }, want: "unk_token"},
		{name: "normalizer", mutate: func(m map[string]any) { m["normalizer"] = map[string]any{"type": "NFC"} }, want: `unsupported normalizer "NFC"`},
		{name: "no pre-tokenizer", mutate: func(m map[string]any) { m["pre_tokenizer"] = nil }, want: "unsupported pre_tokenizer"},
		{name: "GPT-2 pre-tokenizer", mutate: func(m map[string]any) {
			m["pre_tokenizer"] = map[string]any{"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}
		}, want: `unsupported pre_tokenizer "ByteLevel"`},
		{name: "other split regex", mutate: func(m map[string]any) {
			split(m)["pattern"] = map[string]any{"Regex": `\s+`}
		}, want: "Split regex"},
		{name: "split behavior", mutate: func(m map[string]any) { split(m)["behavior"] = "Removed" }, want: "behavior"},
		{name: "byte level with regex", mutate: func(m map[string]any) {
			m["pre_tokenizer"].(map[string]any)["pretokenizers"].([]any)[1].(map[string]any)["use_regex"] = true
		}, want: "use_regex=false"},
		{name: "decoder", mutate: func(m map[string]any) { m["decoder"] = map[string]any{"type": "WordPiece"} }, want: `unsupported decoder "WordPiece"`},
		{name: "added token empty", mutate: func(m map[string]any) {
			m["added_tokens"] = []any{map[string]any{"id": 5000, "content": ""}}
		}, want: "empty content"},
		{name: "added token single word", mutate: func(m map[string]any) {
			m["added_tokens"] = []any{map[string]any{"id": 5000, "content": "<x>", "single_word": true}}
		}, want: "single_word"},
		{name: "negative id", mutate: func(m map[string]any) {
			m["added_tokens"] = []any{map[string]any{"id": -1, "content": "<x>"}}
		}, want: "out of range"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data := []byte(tt.raw)
			if tt.mutate != nil {
				m := fixtureMap(t)
				tt.mutate(m)
				data = mustJSON(t, m)
			}
			tok, err := FromJSON(data)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("FromJSON: tok=%v err=%v, want error containing %q", tok != nil, err, tt.want)
			}
		})
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.json")); err == nil {
		t.Error("Load of a missing file succeeded")
	}
}

// TestStringMerges: the older "a b" merges format gives the same tokenizer.
func TestStringMerges(t *testing.T) {
	m := fixtureMap(t)
	model := m["model"].(map[string]any)
	var merges []any
	for _, p := range model["merges"].([]any) {
		pair := p.([]any)
		merges = append(merges, fmt.Sprintf("%s %s", pair[0], pair[1]))
	}
	model["merges"] = merges
	tok, err := FromJSON(mustJSON(t, m))
	if err != nil {
		t.Fatal(err)
	}
	ref := loadFixture(t)
	for _, c := range readCases(t).Cases {
		if got, want := tok.Encode(c.Text), ref.Encode(c.Text); !slices.Equal(got, want) {
			t.Errorf("%q: string merges give %v, list merges %v", c.Text, got, want)
		}
	}
}

// TestAddedTokenOptions covers lstrip/rstrip, non-special added tokens and
// leftmost-longest matching, which the GLM-4.5 fixture does not use.
func TestAddedTokenOptions(t *testing.T) {
	m := fixtureMap(t)
	m["added_tokens"] = append(m["added_tokens"].([]any),
		map[string]any{"id": 1024, "content": "<L>", "lstrip": true, "special": true, "normalized": false},
		map[string]any{"id": 1025, "content": "<R>", "rstrip": true, "special": true, "normalized": false},
		map[string]any{"id": 1026, "content": "<|user|>x", "special": true, "normalized": false},
		map[string]any{"id": 1027, "content": "hello", "special": false, "normalized": true},
	)
	tok, err := FromJSON(mustJSON(t, m))
	if err != nil {
		t.Fatal(err)
	}
	// Expected ids from Hugging Face tokenizers 0.23.2 on the same file.
	tests := []struct {
		text string
		want []int
	}{
		{"a  <L>b", []int{64, 1024, 65}},
		{"<R>  b", []int{1025, 65}},
		{"<|user|>xy", []int{1026, 88}},
		{"<|user|>y", []int{1010, 88}},
		{"say hello", []int{82, 64, 88, 220, 1027}},
		{"a\n\u3000<L>", []int{64, 1024}},
		{"<R>\u3000\n c", []int{1025, 66}},
		{"x <L> <R> y", []int{87, 1024, 220, 1025, 88}},
	}
	for _, tt := range tests {
		if ids := tok.Encode(tt.text); !slices.Equal(ids, tt.want) {
			t.Errorf("Encode(%q) = %v, want %v", tt.text, ids, tt.want)
		}
	}
	if tok.IsSpecial(1027) || !tok.IsSpecial(1024) {
		t.Error("special flags wrong")
	}
	if tok.VocabSize() != 1028 {
		t.Errorf("VocabSize = %d, want 1028", tok.VocabSize())
	}
}

// TestAddedTokenIDsAssignedLikeHuggingFace: tokenizers ignores the "id" of
// added tokens on load; expectations are tokenizers 0.23.2's on the same file.
func TestAddedTokenIDsAssignedLikeHuggingFace(t *testing.T) {
	m := fixtureMap(t)
	added := m["added_tokens"].([]any)
	added[0].(map[string]any)["id"] = 3000 // <|endoftext|> keeps 1003
	m["added_tokens"] = append(added,
		map[string]any{"id": 5000, "content": "<x>", "special": true, "normalized": false},
		map[string]any{"id": 7, "content": "<y>", "special": true, "normalized": false},
		map[string]any{"id": 9000, "content": "he", "special": true, "normalized": false},
	)
	tok, err := FromJSON(mustJSON(t, m))
	if err != nil {
		t.Fatal(err)
	}
	for text, want := range map[string]int{"<x>": 1024, "<y>": 1025, "he": 278, "<|endoftext|>": 1003, "[MASK]": 1004} {
		if ids := tok.Encode(text); !slices.Equal(ids, []int{want}) {
			t.Errorf("Encode(%q) = %v, want [%d]", text, ids, want)
		}
	}
	if !tok.IsSpecial(278) || tok.VocabSize() != 1026 {
		t.Errorf("IsSpecial(278) = %v, VocabSize = %d; want true, 1026", tok.IsSpecial(278), tok.VocabSize())
	}
	if got := tok.Decode([]int{1003, 1024, 1025, 278, 5000, 3000}); got != "<|endoftext|><x><y>he" {
		t.Errorf("Decode = %q", got)
	}
}

package tokenizer

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// The subset of Hugging Face's tokenizer.json that GLM-4.5 uses.
type fileJSON struct {
	AddedTokens  []addedTokenJSON `json:"added_tokens"`
	Normalizer   json.RawMessage  `json:"normalizer"`
	PreTokenizer json.RawMessage  `json:"pre_tokenizer"`
	Decoder      json.RawMessage  `json:"decoder"`
	Model        *modelJSON       `json:"model"`
}

type addedTokenJSON struct {
	ID         int    `json:"id"`
	Content    string `json:"content"`
	SingleWord bool   `json:"single_word"`
	LStrip     bool   `json:"lstrip"`
	RStrip     bool   `json:"rstrip"`
	Special    bool   `json:"special"`
	Normalized *bool  `json:"normalized"`
}

type modelJSON struct {
	Type                    string          `json:"type"`
	Vocab                   map[string]int  `json:"vocab"`
	Merges                  json.RawMessage `json:"merges"`
	UnkToken                *string         `json:"unk_token"`
	Dropout                 *float64        `json:"dropout"`
	ContinuingSubwordPrefix *string         `json:"continuing_subword_prefix"`
	EndOfWordSuffix         *string         `json:"end_of_word_suffix"`
	FuseUnk                 bool            `json:"fuse_unk"`
	ByteFallback            bool            `json:"byte_fallback"`
	IgnoreMerges            bool            `json:"ignore_merges"`
}

type componentJSON struct {
	Type          string          `json:"type"`
	PreTokenizers []componentJSON `json:"pretokenizers"`
	Pattern       *struct {
		Regex  *string `json:"Regex"`
		String *string `json:"String"`
	} `json:"pattern"`
	Behavior       string `json:"behavior"`
	Invert         bool   `json:"invert"`
	AddPrefixSpace bool   `json:"add_prefix_space"`
	UseRegex       *bool  `json:"use_regex"`
}

// Load reads a tokenizer.json file, or the tokenizer.json inside a directory.
func Load(path string) (*Tokenizer, error) {
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		path = filepath.Join(path, "tokenizer.json")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load tokenizer: %w", err)
	}
	t, err := FromJSON(data)
	if err != nil {
		return nil, fmt.Errorf("load tokenizer %s: %w", path, err)
	}
	return t, nil
}

// FromJSON builds a tokenizer from the contents of a tokenizer.json. It
// accepts byte-level BPE with GLM-4.5's pre-tokenizer (Split on its regex, then
// ByteLevel without regex) and ByteLevel decoder; anything else is an error
// rather than a silently different tokenization.
func FromJSON(data []byte) (*Tokenizer, error) {
	var f fileJSON
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("parse tokenizer.json: %w", err)
	}
	if f.Model == nil {
		return nil, errors.New("tokenizer.json has no model")
	}
	if err := checkNormalizer(f.Normalizer); err != nil {
		return nil, err
	}
	if err := checkPreTokenizer(f.PreTokenizer); err != nil {
		return nil, err
	}
	if err := checkDecoder(f.Decoder); err != nil {
		return nil, err
	}
	t := &Tokenizer{bl: newByteLevel(), addedID: make(map[string]int)}
	m, err := t.buildModel(f.Model)
	if err != nil {
		return nil, err
	}
	t.model = m
	if err := t.addTokens(f.AddedTokens, len(f.Model.Vocab)); err != nil {
		return nil, err
	}
	t.finish()
	return t, nil
}

func isNull(raw json.RawMessage) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) == 0 || string(raw) == "null"
}

func checkNormalizer(raw json.RawMessage) error {
	if isNull(raw) {
		return nil
	}
	var c componentJSON
	if err := json.Unmarshal(raw, &c); err != nil {
		return fmt.Errorf("parse normalizer: %w", err)
	}
	return fmt.Errorf("unsupported normalizer %q (GLM-4.5 uses none)", c.Type)
}

func checkPreTokenizer(raw json.RawMessage) error {
	if isNull(raw) {
		return errors.New("unsupported pre_tokenizer: none (want GLM-4.5's Split + ByteLevel)")
	}
	var c componentJSON
	if err := json.Unmarshal(raw, &c); err != nil {
		return fmt.Errorf("parse pre_tokenizer: %w", err)
	}
	if c.Type != "Sequence" || len(c.PreTokenizers) != 2 {
		return fmt.Errorf("unsupported pre_tokenizer %q (want a Sequence of GLM-4.5's Split and ByteLevel)", c.Type)
	}
	split, bl := c.PreTokenizers[0], c.PreTokenizers[1]
	if split.Type != "Split" || split.Pattern == nil || split.Pattern.Regex == nil {
		return fmt.Errorf("unsupported pre_tokenizer: first step is %q, want Split with a Regex pattern", split.Type)
	}
	if *split.Pattern.Regex != glm45SplitPattern {
		return fmt.Errorf("unsupported pre_tokenizer Split regex %q (only GLM-4.5's pattern is implemented)", *split.Pattern.Regex)
	}
	if split.Behavior != "Isolated" || split.Invert {
		return fmt.Errorf("unsupported pre_tokenizer Split behavior %q invert=%v (want Isolated, false)", split.Behavior, split.Invert)
	}
	// use_regex defaults to true in Hugging Face, so it must be given as false.
	if bl.Type != "ByteLevel" || bl.AddPrefixSpace || bl.UseRegex == nil || *bl.UseRegex {
		return fmt.Errorf("unsupported pre_tokenizer: second step %q must be ByteLevel with add_prefix_space=false, use_regex=false", bl.Type)
	}
	return nil
}

func checkDecoder(raw json.RawMessage) error {
	if isNull(raw) {
		return errors.New("unsupported decoder: none (want ByteLevel)")
	}
	var c componentJSON
	if err := json.Unmarshal(raw, &c); err != nil {
		return fmt.Errorf("parse decoder: %w", err)
	}
	if c.Type != "ByteLevel" {
		return fmt.Errorf("unsupported decoder %q (want ByteLevel)", c.Type)
	}
	return nil
}

func (t *Tokenizer) buildModel(mj *modelJSON) (*bpe, error) {
	if mj.Type != "BPE" {
		return nil, fmt.Errorf("unsupported model type %q (want BPE)", mj.Type)
	}
	if mj.ContinuingSubwordPrefix != nil && *mj.ContinuingSubwordPrefix != "" {
		return nil, errors.New("unsupported BPE continuing_subword_prefix")
	}
	if mj.EndOfWordSuffix != nil && *mj.EndOfWordSuffix != "" {
		return nil, errors.New("unsupported BPE end_of_word_suffix")
	}
	if mj.Dropout != nil && *mj.Dropout != 0 {
		return nil, fmt.Errorf("unsupported BPE dropout %v (inference tokenization must be deterministic)", *mj.Dropout)
	}
	if mj.ByteFallback {
		return nil, errors.New("unsupported BPE byte_fallback with a byte-level alphabet")
	}
	if len(mj.Vocab) == 0 {
		return nil, errors.New("BPE model has an empty vocab")
	}
	m := &bpe{
		merges:       make(map[uint64]merge),
		unkID:        -1,
		fuseUnk:      mj.FuseUnk,
		ignoreMerges: mj.IgnoreMerges,
		vocab:        mj.Vocab,
		bl:           t.bl,
	}
	for tok, id := range mj.Vocab {
		if id < 0 || id > 1<<30 {
			return nil, fmt.Errorf("vocab token %q has id %d out of range", tok, id)
		}
		t.setToken(id, tok)
	}
	for b := 0; b < 256; b++ {
		m.byteID[b] = -1
		if id, ok := m.vocab[string(t.bl.toRune[b])]; ok {
			m.byteID[b] = int32(id)
		}
	}
	if mj.UnkToken != nil {
		id, ok := m.vocab[*mj.UnkToken]
		if !ok {
			return nil, fmt.Errorf("unk_token %q not in vocab", *mj.UnkToken)
		}
		m.unkID = int32(id)
	}
	pairs, err := parseMerges(mj.Merges)
	if err != nil {
		return nil, err
	}
	for rank, p := range pairs {
		a, okA := m.vocab[p[0]]
		b, okB := m.vocab[p[1]]
		if !okA || !okB {
			return nil, fmt.Errorf("merge %d (%q %q) uses a token missing from the vocab", rank, p[0], p[1])
		}
		id, ok := m.vocab[p[0]+p[1]]
		if !ok {
			return nil, fmt.Errorf("merge %d (%q %q) makes %q, which is missing from the vocab", rank, p[0], p[1], p[0]+p[1])
		}
		k := pairKey(int32(a), int32(b))
		if _, dup := m.merges[k]; !dup { // the first listing wins, as in Hugging Face
			m.merges[k] = merge{rank: int32(rank), newID: int32(id)}
		}
	}
	return m, nil
}

// parseMerges accepts both the list format [["a","b"],...] and the older
// "a b" string format, decoding the list in one pass.
func parseMerges(raw json.RawMessage) ([][2]string, error) {
	raw = bytes.TrimSpace(raw)
	if isNull(raw) {
		return nil, nil
	}
	if len(raw) < 2 || raw[0] != '[' {
		return nil, errors.New("parse merges: want a list")
	}
	if first := bytes.TrimSpace(raw[1:]); len(first) > 0 && first[0] == '"' {
		var lines []string
		if err := json.Unmarshal(raw, &lines); err != nil {
			return nil, fmt.Errorf("parse merges: %w", err)
		}
		out := make([][2]string, len(lines))
		for i, line := range lines {
			a, b, ok := strings.Cut(line, " ")
			if !ok || strings.Contains(b, " ") {
				return nil, fmt.Errorf("merge %d %q: want two tokens separated by one space", i, line)
			}
			out[i] = [2]string{a, b}
		}
		return out, nil
	}
	var pairs [][]string
	if err := json.Unmarshal(raw, &pairs); err != nil {
		return nil, fmt.Errorf("parse merges: want a list of token pairs: %w", err)
	}
	out := make([][2]string, len(pairs))
	for i, p := range pairs {
		if len(p) != 2 {
			return nil, fmt.Errorf("merge %d %q: want a pair of token strings", i, p)
		}
		out[i] = [2]string{p[0], p[1]}
	}
	return out, nil
}

// addTokens registers the added tokens. Their ids are assigned the way
// Hugging Face assigns them on load, which ignores the "id" fields: a token
// already in the vocabulary keeps that id, any other takes the next id after
// the vocabulary and the added tokens so far. For well-formed files (GLM-4.5's
// included) this is the id the file states.
func (t *Tokenizer) addTokens(added []addedTokenJSON, vocabLen int) error {
	var raw, normal []addedToken
	maxAdded := -1
	for _, a := range added {
		if a.Content == "" {
			return fmt.Errorf("added token %d has empty content", a.ID)
		}
		if a.ID < 0 || a.ID > 1<<30 {
			return fmt.Errorf("added token %q has id %d out of range", a.Content, a.ID)
		}
		if a.SingleWord {
			return fmt.Errorf("added token %q: single_word is not supported", a.Content)
		}
		id, known := t.addedID[a.Content]
		if !known {
			id, known = t.model.vocab[a.Content]
		}
		if !known {
			id = vocabLen
			if maxAdded >= 0 && (maxAdded >= vocabLen || vocabLen == 0) {
				id = maxAdded + 1
			}
		}
		maxAdded = max(maxAdded, id)
		t.setToken(id, a.Content)
		t.addedID[a.Content] = id
		if a.Special {
			t.special[id] = true
		}
		// Hugging Face matches tokens with normalized=false on the raw text
		// first, then the others in the gaps; the default is !special.
		normalized := !a.Special
		if a.Normalized != nil {
			normalized = *a.Normalized
		}
		tok := addedToken{id: id, text: a.Content, lstrip: a.LStrip, rstrip: a.RStrip}
		if normalized {
			normal = append(normal, tok)
		} else {
			raw = append(raw, tok)
		}
	}
	t.rawMatcher = newAddedMatcher(raw)
	t.normMatcher = newAddedMatcher(normal)
	return nil
}

func (t *Tokenizer) setToken(id int, text string) {
	if id >= len(t.idText) {
		n := max(id+1, 2*len(t.idText))
		grown := make([]string, n)
		copy(grown, t.idText)
		t.idText = grown
		grownOK := make([]bool, n)
		copy(grownOK, t.idOK)
		t.idOK = grownOK
		grownSp := make([]bool, n)
		copy(grownSp, t.special)
		t.special = grownSp
	}
	t.idText[id], t.idOK[id] = text, true
	if id+1 > t.size {
		t.size = id + 1
	}
}

// Package tokenizer implements GLM-4.5's Hugging Face tokenizer natively:
// byte-level BPE with GLM-4.5's Split pre-tokenizer and added/special tokens,
// producing the same ids as the tokenizers library.
//
// The pre-tokenizer regex is implemented as a hand-written matcher (see
// pretokenize.go) instead of a regex engine: Go's regexp cannot express its
// `(?!\S)` lookahead, and a backtracking engine is an order of magnitude
// slower. BPE follows Hugging Face's merge-rank semantics exactly.
package tokenizer

import (
	"unicode"
	"unicode/utf8"
)

// Tokenizer encodes text to token ids and back. It is safe for concurrent use.
type Tokenizer struct {
	bl      *byteLevel
	model   *bpe
	addedID map[string]int // added tokens by content (the vocab is in model)
	idText  []string       // token text by id
	idOK    []bool         // whether an id is assigned
	idBytes [][]byte       // what each token decodes to
	special []bool
	size    int // highest id + 1

	// Added tokens are split out of the text before pre-tokenization, those
	// with normalized=false first (see addTokens).
	rawMatcher, normMatcher *addedMatcher
}

// Encode returns the ids of text. Added and special tokens written in the text
// (e.g. "<|user|>") are recognised as those tokens, as Hugging Face does; no
// template tokens are added around the text.
func (t *Tokenizer) Encode(text string) []int {
	ids := make([]int, 0, len(text)/2+1)
	bmp := bmpClass()
	t.rawMatcher.split(text, func(seg string, id int) {
		if id >= 0 {
			ids = append(ids, id)
			return
		}
		t.normMatcher.split(seg, func(seg string, id int) {
			if id >= 0 {
				ids = append(ids, id)
				return
			}
			for i := 0; i < len(seg); {
				end := nextPiece(seg, i, bmp)
				ids = t.model.encodePiece(ids, seg[i:end])
				i = end
			}
		})
	})
	return ids
}

// Decode returns the text of ids, special tokens included as their text. Ids
// outside the vocabulary are skipped; byte sequences that are not valid UTF-8
// become U+FFFD, as in Hugging Face's decoding.
func (t *Tokenizer) Decode(ids []int) string {
	return t.decode(ids, false)
}

// DecodeSkipSpecial is Decode without special tokens (skip_special_tokens).
func (t *Tokenizer) DecodeSkipSpecial(ids []int) string {
	return t.decode(ids, true)
}

func (t *Tokenizer) decode(ids []int, skipSpecial bool) string {
	raw := make([]byte, 0, 4*len(ids))
	for _, id := range ids {
		if !t.valid(id) || (skipSpecial && t.special[id]) {
			continue
		}
		raw = append(raw, t.idBytes[id]...)
	}
	if utf8.Valid(raw) {
		return string(raw)
	}
	return string(appendLossy(nil, raw))
}

func (t *Tokenizer) valid(id int) bool { return id >= 0 && id < len(t.idOK) && t.idOK[id] }

// TokenID looks up a token by its exact token text: a vocabulary entry in its
// byte-level form (e.g. "Ġthe") or an added token such as "<|user|>".
func (t *Tokenizer) TokenID(token string) (int, bool) {
	if id, ok := t.addedID[token]; ok {
		return id, true
	}
	id, ok := t.model.vocab[token]
	return id, ok
}

// TokenText returns the token text of id (its vocabulary form, e.g. "Ġthe", or
// an added token's content).
func (t *Tokenizer) TokenText(id int) (string, bool) {
	if !t.valid(id) {
		return "", false
	}
	return t.idText[id], true
}

// TokenBytes returns the bytes id decodes to (possibly part of a UTF-8
// character). The slice must not be modified.
func (t *Tokenizer) TokenBytes(id int) ([]byte, bool) {
	if !t.valid(id) {
		return nil, false
	}
	return t.idBytes[id], true
}

// VocabSize is the highest token id + 1, added tokens included.
func (t *Tokenizer) VocabSize() int { return t.size }

// IsSpecial reports whether id is an added token marked special.
func (t *Tokenizer) IsSpecial(id int) bool { return t.valid(id) && t.special[id] }

// finish precomputes per-id decode bytes once all tokens are known.
func (t *Tokenizer) finish() {
	t.idBytes = make([][]byte, len(t.idText))
	for id, text := range t.idText {
		if t.idOK[id] {
			t.idBytes[id] = t.bl.decodeToken(text)
		}
	}
}

type addedToken struct {
	id             int
	text           string
	lstrip, rstrip bool
}

// addedMatcher finds added tokens in text with leftmost-longest semantics
// (Hugging Face uses an Aho-Corasick automaton in that mode), using a byte
// trie: at each position the trie walk yields the longest token there.
type addedMatcher struct {
	nodes  []trieNode
	tokens []addedToken
	first  [256]bool // bytes some token starts with
}

type trieNode struct {
	edges []trieEdge // few per node: a linear scan beats a map
	token int32      // index into tokens, -1 if no token ends here
}

type trieEdge struct {
	b     byte
	child int32
}

func (n *trieNode) child(b byte) (int32, bool) {
	for _, e := range n.edges {
		if e.b == b {
			return e.child, true
		}
	}
	return 0, false
}

func newAddedMatcher(tokens []addedToken) *addedMatcher {
	m := &addedMatcher{nodes: []trieNode{{token: -1}}}
	for _, tok := range tokens {
		n := int32(0)
		for i := 0; i < len(tok.text); i++ {
			c := tok.text[i]
			child, ok := m.nodes[n].child(c)
			if !ok {
				child = int32(len(m.nodes))
				m.nodes[n].edges = append(m.nodes[n].edges, trieEdge{c, child})
				m.nodes = append(m.nodes, trieNode{token: -1})
			}
			n = child
		}
		m.first[tok.text[0]] = true
		m.nodes[n].token = int32(len(m.tokens))
		m.tokens = append(m.tokens, tok)
	}
	return m
}

// longestAt returns the longest token starting at s[i], or -1.
func (m *addedMatcher) longestAt(s string, i int) (tok int, end int) {
	tok, n := -1, int32(0)
	for j := i; j < len(s); j++ {
		child, ok := m.nodes[n].child(s[j])
		if !ok {
			break
		}
		n = child
		if m.nodes[n].token >= 0 {
			tok, end = int(m.nodes[n].token), j+1
		}
	}
	return tok, end
}

// split calls emit for each stretch of s in order: plain text with id -1, or a
// matched token with its id. Whitespace next to an lstrip/rstrip token is
// absorbed into the token, as in Hugging Face.
func (m *addedMatcher) split(s string, emit func(seg string, id int)) {
	if len(m.tokens) == 0 {
		if s != "" {
			emit(s, -1)
		}
		return
	}
	plain := 0 // start of the pending plain stretch
	for i := 0; i < len(s); {
		if !m.first[s[i]] {
			i++
			continue
		}
		ti, end := m.longestAt(s, i)
		if ti < 0 {
			i++
			continue
		}
		tok := m.tokens[ti]
		start := i
		if tok.lstrip {
			for start > plain {
				r, w := utf8.DecodeLastRuneInString(s[plain:start])
				if !unicode.IsSpace(r) {
					break
				}
				start -= w
			}
		}
		if tok.rstrip {
			for end < len(s) {
				r, w := utf8.DecodeRuneInString(s[end:])
				if !unicode.IsSpace(r) {
					break
				}
				end += w
			}
		}
		if start > plain {
			emit(s[plain:start], -1)
		}
		emit(s[start:end], tok.id)
		plain, i = end, end
	}
	if plain < len(s) {
		emit(s[plain:], -1)
	}
}

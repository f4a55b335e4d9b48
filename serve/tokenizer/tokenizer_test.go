package tokenizer

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
)

const fixtureDir = "../../testdata/text/tokenizer"

func loadFixture(t testing.TB) *Tokenizer {
	t.Helper()
	tok, err := Load(filepath.Join(fixtureDir, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

type fixtureCases struct {
	Cases []struct {
		Text    string   `json:"text"`
		IDs     []int    `json:"ids"`
		Tokens  []string `json:"tokens"`
		Decoded string   `json:"decoded"`
	} `json:"cases"`
	LongTextChars  int    `json:"long_text_chars"`
	LongTextCount  int    `json:"long_text_ids_count"`
	LongTextSHA256 string `json:"long_text_ids_sha256"`
}

func readCases(t testing.TB) fixtureCases {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(fixtureDir, "cases.json"))
	if err != nil {
		t.Fatal(err)
	}
	var c fixtureCases
	if err := json.Unmarshal(data, &c); err != nil {
		t.Fatal(err)
	}
	return c
}

func TestFixtureCases(t *testing.T) {
	tok := loadFixture(t)
	cases := readCases(t)
	if len(cases.Cases) != 49 {
		t.Fatalf("fixture has %d cases, want 49", len(cases.Cases))
	}
	for _, c := range cases.Cases {
		t.Run(strconv.Quote(trunc(c.Text, 40)), func(t *testing.T) {
			ids := tok.Encode(c.Text)
			if !slices.Equal(ids, c.IDs) && !(len(ids) == 0 && len(c.IDs) == 0) {
				t.Fatalf("ids\n got %v\nwant %v", ids, c.IDs)
			}
			for i, id := range ids {
				text, ok := tok.TokenText(id)
				if !ok || text != c.Tokens[i] {
					t.Errorf("token %d: TokenText(%d) = %q, %v; want %q", i, id, text, ok, c.Tokens[i])
				}
			}
			if got := tok.Decode(ids); got != c.Decoded {
				t.Errorf("Decode = %q, want %q", got, c.Decoded)
			}
		})
	}
}

func trunc(s string, n int) string {
	if r := []rune(s); len(r) > n {
		return string(r[:n]) + "…"
	}
	return s
}

// idsJSON writes ids as the fixture hashes them: "[1, 2, 3]".
func idsJSON(ids []int) string {
	var b strings.Builder
	b.WriteByte('[')
	for i, id := range ids {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(strconv.Itoa(id))
	}
	b.WriteByte(']')
	return b.String()
}

func TestLongText(t *testing.T) {
	tok := loadFixture(t)
	cases := readCases(t)
	data, err := os.ReadFile(filepath.Join(fixtureDir, "long_text.txt"))
	if err != nil {
		t.Fatal(err)
	}
	text := string(data)
	if n := len([]rune(text)); n != cases.LongTextChars {
		t.Fatalf("long text has %d chars, fixture says %d", n, cases.LongTextChars)
	}
	ids := tok.Encode(text)
	if len(ids) != cases.LongTextCount {
		t.Errorf("long text: %d ids, want %d", len(ids), cases.LongTextCount)
	}
	sum := sha256.Sum256([]byte(idsJSON(ids)))
	if got := hex.EncodeToString(sum[:]); got != cases.LongTextSHA256 {
		t.Errorf("long text ids sha256 = %s, want %s", got, cases.LongTextSHA256)
	}
	if got := tok.Decode(ids); got != text {
		t.Error("long text does not decode back to itself")
	}
}

// TestConcurrentEncode runs encoders in parallel on a cold cache; run with
// -race it checks the shared BPE cache.
func TestConcurrentEncode(t *testing.T) {
	tok := loadFixture(t)
	cases := readCases(t)
	var wg sync.WaitGroup
	errs := make(chan string, 8*len(cases.Cases))
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, c := range cases.Cases {
				if ids := tok.Encode(c.Text); !slices.Equal(ids, c.IDs) && len(c.IDs) > 0 {
					errs <- c.Text
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for text := range errs {
		t.Errorf("concurrent encode of %q differs", text)
	}
}

func TestTokenLookup(t *testing.T) {
	tok := loadFixture(t)
	if got := tok.VocabSize(); got != 1024 {
		t.Errorf("VocabSize = %d, want 1024", got)
	}
	specials := []string{"<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>",
		"<|user|>", "<|assistant|>", "<|observation|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
		"<tool_response>", "</tool_response>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "/nothink"}
	for i, s := range specials {
		id, ok := tok.TokenID(s)
		if !ok || id != 1003+i {
			t.Errorf("TokenID(%q) = %d, %v; want %d", s, id, ok, 1003+i)
			continue
		}
		if !tok.IsSpecial(id) {
			t.Errorf("IsSpecial(%d) = false for %q", id, s)
		}
		if text, ok := tok.TokenText(id); !ok || text != s {
			t.Errorf("TokenText(%d) = %q, %v", id, text, ok)
		}
	}
	space, ok := tok.TokenID("Ġ")
	if !ok || space != 220 || tok.IsSpecial(space) {
		t.Errorf("TokenID(Ġ) = %d, %v (special %v); want 220, not special", space, ok, tok.IsSpecial(space))
	}
	if b, ok := tok.TokenBytes(space); !ok || string(b) != " " {
		t.Errorf("TokenBytes(220) = %q, %v; want a space", b, ok)
	}
	for _, id := range []int{-1, 1024, 1 << 40} {
		if _, ok := tok.TokenText(id); ok || tok.IsSpecial(id) {
			t.Errorf("id %d should be unknown", id)
		}
	}
	if _, ok := tok.TokenID("<|nope|>"); ok {
		t.Error("TokenID found a token that does not exist")
	}
	ids := tok.Encode("<|user|>\nhi<|assistant|>")
	if got := tok.DecodeSkipSpecial(ids); got != "\nhi" {
		t.Errorf("DecodeSkipSpecial = %q, want %q", got, "\nhi")
	}
	if got := tok.Decode(append(ids, -5, 99999)); got != "<|user|>\nhi<|assistant|>" {
		t.Errorf("Decode with unknown ids = %q", got)
	}
}

func TestLoadDirectory(t *testing.T) {
	tok, err := Load(fixtureDir)
	if err != nil {
		t.Fatal(err)
	}
	if tok.VocabSize() != 1024 {
		t.Errorf("VocabSize = %d", tok.VocabSize())
	}
	if _, err := Load(t.TempDir()); err == nil {
		t.Error("Load of a directory without tokenizer.json succeeded")
	}
}

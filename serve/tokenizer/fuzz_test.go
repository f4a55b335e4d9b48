package tokenizer

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unicode/utf8"
)

func FuzzEncode(f *testing.F) {
	tok := loadFixture(f)
	for _, c := range readCases(f).Cases {
		f.Add(c.Text)
	}
	f.Add("\xe4\xb8 broken \xff utf8")
	f.Add(strings.Repeat("ab", 200))
	f.Fuzz(func(t *testing.T, s string) {
		ids := tok.Encode(s) // must not panic, whatever s is
		for _, id := range ids {
			if _, ok := tok.TokenText(id); !ok {
				t.Fatalf("Encode(%q) produced unknown id %d", s, id)
			}
		}
		got := tok.Decode(ids)
		if !utf8.ValidString(s) {
			if !utf8.ValidString(got) {
				t.Fatalf("Decode returned invalid UTF-8 for %q", s)
			}
			return
		}
		if containsAdded(tok, s) {
			return
		}
		if got != s {
			t.Fatalf("Decode(Encode(%q)) = %q", s, got)
		}
		// No special ids may come out of text without special-token text.
		for _, id := range ids {
			if tok.IsSpecial(id) {
				t.Fatalf("Encode(%q) produced special id %d", s, id)
			}
		}
	})
}

func containsAdded(tok *Tokenizer, s string) bool {
	for _, m := range []*addedMatcher{tok.rawMatcher, tok.normMatcher} {
		for _, a := range m.tokens {
			if strings.Contains(s, a.text) {
				return true
			}
		}
	}
	return false
}

func BenchmarkEncodeLongText(b *testing.B) {
	tok := loadFixture(b)
	data, err := os.ReadFile(filepath.Join(fixtureDir, "long_text.txt"))
	if err != nil {
		b.Fatal(err)
	}
	text := string(data)
	b.SetBytes(int64(len(text)))
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		tok.Encode(text)
	}
}

// BenchmarkEncodeLongTextCold measures a fresh tokenizer each time, so every
// piece goes through BPE instead of the cache.
func BenchmarkEncodeLongTextCold(b *testing.B) {
	raw, err := os.ReadFile(filepath.Join(fixtureDir, "tokenizer.json"))
	if err != nil {
		b.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(fixtureDir, "long_text.txt"))
	if err != nil {
		b.Fatal(err)
	}
	text := string(data)
	b.SetBytes(int64(len(text)))
	for b.Loop() {
		b.StopTimer()
		tok, err := FromJSON(raw)
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		tok.Encode(text)
	}
}

func BenchmarkDecodeLongText(b *testing.B) {
	tok := loadFixture(b)
	data, err := os.ReadFile(filepath.Join(fixtureDir, "long_text.txt"))
	if err != nil {
		b.Fatal(err)
	}
	ids := tok.Encode(string(data))
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		tok.Decode(ids)
	}
}

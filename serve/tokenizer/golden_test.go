package tokenizer

import (
	"encoding/json"
	"os"
	"slices"
	"strings"
	"testing"
)

// hf_golden.json holds random texts and id sequences with what Hugging Face
// tokenizers 0.23.2 returns for them (see testdata/gen_hf_golden.js): a
// differential test of the pre-tokenizer, BPE, added-token matching and the
// lossy UTF-8 decoding beyond the hand-picked fixture cases.
type hfGolden struct {
	Encode []struct {
		Text string `json:"text"`
		IDs  []int  `json:"ids"`
	} `json:"encode"`
	Decode []struct {
		IDs             []int  `json:"ids"`
		Text            string `json:"text"`
		TextSkipSpecial string `json:"text_skip_special"`
	} `json:"decode"`
}

func readGolden(t *testing.T) hfGolden {
	t.Helper()
	data, err := os.ReadFile("testdata/hf_golden.json")
	if err != nil {
		t.Fatal(err)
	}
	var g hfGolden
	if err := json.Unmarshal(data, &g); err != nil {
		t.Fatal(err)
	}
	if len(g.Encode) < 1000 || len(g.Decode) < 500 {
		t.Fatalf("golden file has only %d encode and %d decode cases", len(g.Encode), len(g.Decode))
	}
	return g
}

func TestHuggingFaceGoldenEncode(t *testing.T) {
	tok := loadFixture(t)
	failures := 0
	for _, c := range readGolden(t).Encode {
		ids := tok.Encode(c.Text)
		if !slices.Equal(ids, c.IDs) && len(ids)+len(c.IDs) > 0 {
			if failures++; failures <= 10 {
				t.Errorf("Encode(%q)\n got %v\nwant %v", c.Text, ids, c.IDs)
			}
		}
		if got := tok.Decode(ids); got != c.Text {
			t.Errorf("Decode(Encode(%q)) = %q", c.Text, got)
		}
	}
}

func TestHuggingFaceGoldenDecode(t *testing.T) {
	tok := loadFixture(t)
	for _, c := range readGolden(t).Decode {
		if got := tok.Decode(c.IDs); got != c.Text {
			t.Errorf("Decode(%v) = %q, want %q", c.IDs, got, c.Text)
		}
		if got := tok.DecodeSkipSpecial(c.IDs); got != c.TextSkipSpecial {
			t.Errorf("DecodeSkipSpecial(%v) = %q, want %q", c.IDs, got, c.TextSkipSpecial)
		}
		// Streaming the same ids gives the same text, and never half a
		// character before the end.
		d := tok.NewStreamDecoder()
		var b strings.Builder
		for _, id := range c.IDs {
			b.WriteString(d.Add(id))
		}
		b.WriteString(d.Flush())
		if b.String() != c.Text {
			t.Errorf("stream of %v = %q, want %q", c.IDs, b.String(), c.Text)
		}
	}
}

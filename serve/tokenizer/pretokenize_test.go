package tokenizer

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"
)

// TestSplitPieces checks the hand-written regex matcher piece by piece. The
// expected pieces are what Hugging Face tokenizers 0.23.2's pre-tokenizer
// returns for the GLM-4.5 pipeline (mapped back from byte-level form).
func TestSplitPieces(t *testing.T) {
	tests := []struct {
		text string
		want []string
	}{
		{"'ſx", []string{"'ſ", "x"}},
		{"'sx", []string{"'s", "x"}},
		{"'Sx", []string{"'S", "x"}},
		{"x'LL", []string{"x", "'LL"}},
		{"ab'Re'vE", []string{"ab", "'Re", "'vE"}},
		{"'quotes'", []string{"'quotes", "'"}},
		{"I'M YOU'RE", []string{"I", "'M", " YOU", "'RE"}},
		{"Hello world", []string{"Hello", " world"}},
		{"  \n \n  x", []string{"  \n \n", " ", " x"}},
		{"  \n", []string{"  \n"}},
		{"a  b", []string{"a", " ", " b"}},
		{"a \t b", []string{"a", " \t", " b"}},
		{"end  ", []string{"end", "  "}},
		{"\u0085x", []string{"\u0085x"}},
		{"\u001c\u001cz", []string{"\u001c\u001c", "z"}},
		{"mixed\u00a0 \u00a0spaces", []string{"mixed", "\u00a0 ", "\u00a0spaces"}},
		{"12345678901", []string{"123", "456", "789", "01"}},
		{"٣٤٥ ७८९ ①②", []string{"٣٤٥", " ", "७८९", " ", "①②"}},
		{"x=1;y=2\nif x<y:\n    print(x)", []string{"x", "=", "1", ";y", "=", "2", "\n", "if", " x", "<y", ":\n", "   ", " print", "(x", ")"}},
		{"!!!???...;;;\n\n", []string{"!!!???...;;;\n\n"}},
		{" !!\r\nx", []string{" !!\r\n", "x"}},
		{"á combining", []string{"á", " combining"}},
		{"中文测试：模型", []string{"中文测试", "：模型"}},
		{"naïve café", []string{"naïve", " café"}},
		{"\u3000\u3000x", []string{"\u3000", "\u3000x"}},
		{"\t\tx", []string{"\t", "\tx"}},
		{"a\r\n\r\n b", []string{"a", "\r\n\r\n", " b"}},
		{"😀😀 👍🏽", []string{"😀😀", " 👍🏽"}},
		{"$$$ 100", []string{"$$$", " ", "100"}},
		{"\u2028\u2029x", []string{"\u2028", "\u2029x"}},
		{" \u0301x", []string{" \u0301", "x"}},
	}
	for _, tt := range tests {
		var got []string
		splitPieces(tt.text, func(p string) { got = append(got, p) })
		if !slices.Equal(got, tt.want) {
			t.Errorf("splitPieces(%q)\n got %q\nwant %q", tt.text, got, tt.want)
		}
	}
}

// TestSplitPiecesCoverInput: pieces are contiguous, non-empty and rebuild the
// input, whatever it is (invalid UTF-8 included).
func TestSplitPiecesCoverInput(t *testing.T) {
	for _, s := range []string{"", "a", "\xff\xfe x", "\xe4\xb8", strings.Repeat(" ", 100), "'", "' ", "\r", "1\n"} {
		var b strings.Builder
		splitPieces(s, func(p string) {
			if p == "" {
				t.Fatalf("empty piece for %q", s)
			}
			b.WriteString(p)
		})
		if b.String() != s {
			t.Errorf("pieces of %q rebuild %q", s, b.String())
		}
	}
}

// TestMergeStrategiesAgree: the array scan used for short pieces and the heap
// used for long ones merge in the same order.
func TestMergeStrategiesAgree(t *testing.T) {
	tok := loadFixture(t)
	m := tok.model
	for _, s := range []string{"hello world", "abababababababab", "the thing that", "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
		"        ", "line1\nline2", "ing tion ation", strings.Repeat("seesaw", 7)} {
		short := m.mergeAll(m.symbolIDs(s))
		heap := m.mergeHeap(m.symbolIDs(s))
		if !slices.Equal(short, heap) {
			t.Errorf("%q: scan %v, heap %v", s, short, heap)
		}
	}
}

// TestRuneClassesMatchHuggingFace checks the class of every code point
// against the one Hugging Face's regex engine gives it (testdata/hf_classes.txt,
// made by probing tokenizers' pre-tokenizer).
func TestRuneClassesMatchHuggingFace(t *testing.T) {
	data, err := os.ReadFile("testdata/hf_classes.txt")
	if err != nil {
		t.Fatal(err)
	}
	type run struct {
		start rune
		class uint8
	}
	var runs []run
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		if strings.HasPrefix(line, "#") {
			continue
		}
		var r run
		if _, err := fmt.Sscanf(line, "%x %d", &r.start, &r.class); err != nil {
			t.Fatalf("bad line %q: %v", line, err)
		}
		runs = append(runs, r)
	}
	if len(runs) < 1000 {
		t.Fatalf("only %d runs", len(runs))
	}
	bmp := bmpClass()
	mismatches := 0
	for i, r := range runs {
		end := rune(utf8.MaxRune + 1)
		if i+1 < len(runs) {
			end = runs[i+1].start
		}
		for cp := r.start; cp < end; cp++ {
			if cp >= 0xD800 && cp < 0xE000 {
				continue
			}
			s := string(cp)
			_, _, got := runeAt(s, 0, bmp)
			if got != r.class {
				if mismatches++; mismatches <= 10 {
					t.Errorf("U+%04X: class %d, Hugging Face %d", cp, got, r.class)
				}
			}
		}
	}
	if mismatches > 0 {
		t.Errorf("%d code points differ", mismatches)
	}
}

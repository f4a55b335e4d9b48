package tokenizer

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestStreamDecoderHoldsBackPartialCharacters(t *testing.T) {
	tok := loadFixture(t)
	tests := []struct {
		name string
		text string
	}{
		{"cjk", "中文测试：模型推理在多台主机上运行。"},
		{"emoji zwj", "emoji 🙂👍🏽 and ZWJ 👨\u200d👩\u200d👧\u200d👦"},
		{"mixed with specials", "<|user|>\nnaïve café<think>思考</think>😀😀"},
		{"ascii", "Hello world"},
		{"indic digits", "٣٤٥ ७८९ ①②"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ids := tok.Encode(tt.text)
			d := tok.NewStreamDecoder()
			var got strings.Builder
			splitSeen := false
			for _, id := range ids {
				piece := d.Add(id)
				if !utf8.ValidString(piece) {
					t.Fatalf("Add(%d) returned invalid UTF-8 %q", id, piece)
				}
				if b, _ := tok.TokenBytes(id); len(b) > 0 && !utf8.Valid(b) {
					splitSeen = true
				}
				got.WriteString(piece)
			}
			got.WriteString(d.Flush())
			if got.String() != tt.text {
				t.Errorf("streamed %q, want %q", got.String(), tt.text)
			}
			if !utf8.ValidString(tt.text) || (tt.name != "ascii" && !splitSeen) {
				t.Errorf("test text %q does not split a character across tokens", tt.text)
			}
		})
	}
}

func TestStreamDecoderStepByStep(t *testing.T) {
	tok := loadFixture(t)
	// "中" is E4 B8 AD; in this vocabulary it is three single-byte tokens.
	ids := tok.Encode("中a")
	if len(ids) != 4 {
		t.Fatalf("Encode(中a) = %v, want 4 tokens (3 bytes + a)", ids)
	}
	d := tok.NewStreamDecoder()
	for i, want := range []string{"", "", "中", "a"} {
		if got := d.Add(ids[i]); got != want {
			t.Errorf("Add #%d = %q, want %q", i, got, want)
		}
	}
	// An unfinished character at the end is flushed as U+FFFD, like Decode.
	d.Add(ids[0])
	d.Add(ids[1])
	if got, want := d.Flush(), tok.Decode(ids[:2]); got != want || got != "\uFFFD" {
		t.Errorf("Flush = %q, Decode = %q; want one U+FFFD", got, want)
	}
	if got := d.Flush(); got != "" {
		t.Errorf("second Flush = %q, want empty", got)
	}
	// A broken sequence followed by ASCII is released at once.
	d.Add(ids[0])
	if got := d.Add(ids[3]); got != "\uFFFDa" {
		t.Errorf("broken sequence then a = %q", got)
	}
	if got := d.Add(-1); got != "" {
		t.Errorf("Add(-1) = %q", got)
	}
}

func TestStreamDecoderSkipSpecial(t *testing.T) {
	tok := loadFixture(t)
	ids := tok.Encode("<|assistant|>\n<think>x</think>y<|user|>")
	d := tok.NewStreamDecoderSkipSpecial()
	var got strings.Builder
	for _, id := range ids {
		got.WriteString(d.Add(id))
	}
	got.WriteString(d.Flush())
	if got.String() != "\nxy" || got.String() != tok.DecodeSkipSpecial(ids) {
		t.Errorf("skip-special stream = %q", got.String())
	}
}

func TestLossyMatchesRust(t *testing.T) {
	// Rust's from_utf8_lossy replaces each maximal invalid subpart with one
	// U+FFFD (Go's conversions would replace each byte).
	tests := []struct{ in, want string }{
		{"\xe4\xb8", "\uFFFD"},
		{"\xe4\xb8a", "\uFFFDa"},
		{"\xe4\xb8\xe4\xb8\xad", "\uFFFD中"},
		{"\xf0\x9f\x98", "\uFFFD"},
		{"\xe0\x80\x80", "\uFFFD\uFFFD\uFFFD"},
		{"\xed\xa0\x80", "\uFFFD\uFFFD\uFFFD"},
		{"\xff\xfe", "\uFFFD\uFFFD"},
		{"\x80a", "\uFFFDa"},
		{"ok", "ok"},
	}
	for _, tt := range tests {
		if got := string(appendLossy(nil, []byte(tt.in))); got != tt.want {
			t.Errorf("lossy(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestIncompleteTail(t *testing.T) {
	tests := []struct {
		in   string
		want int
	}{
		{"", 0}, {"a", 0}, {"中", 0}, {"\xe4", 1}, {"\xe4\xb8", 2}, {"a\xf0\x9f\x98", 3},
		{"\xe0\x80", 0}, {"\x80", 0}, {"\xf0\x9f\x98\x80", 0}, {"\xc3", 1}, {"\xff", 0},
	}
	for _, tt := range tests {
		if got := incompleteTail([]byte(tt.in)); got != tt.want {
			t.Errorf("incompleteTail(%q) = %d, want %d", tt.in, got, tt.want)
		}
	}
}

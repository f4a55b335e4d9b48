package serving

import (
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRandomLengthsCoverVLLMRange(t *testing.T) {
	for _, tc := range []struct {
		in, out      int
		ratio        float64
		inLo, inHi   int
		outLo, outHi int
	}{
		{8000, 1000, 0, 8000, 8000, 1000, 1000},
		{100, 10, 0.25, 75, 125, 7, 13}, // ⌊7.5⌋, ⌈12.5⌉
		{10, 1, 0.5, 5, 15, 1, 2},       // output floor is at least 1
		{7, 3, 0.33, 4, 10, 2, 4},       // ⌊4.69⌋, ⌈9.31⌉; ⌊2.01⌋, ⌈3.99⌉
	} {
		in, out := randomLengths(newRNG(1, 1), 4000, tc.in, tc.out, tc.ratio)
		minIn, maxIn, minOut, maxOut := math.MaxInt, 0, math.MaxInt, 0
		for i := range in {
			minIn, maxIn = min(minIn, in[i]), max(maxIn, in[i])
			minOut, maxOut = min(minOut, out[i]), max(maxOut, out[i])
		}
		if minIn != tc.inLo || maxIn != tc.inHi || minOut != tc.outLo || maxOut != tc.outHi {
			t.Errorf("%+v: input [%d, %d] output [%d, %d]", tc, minIn, maxIn, minOut, maxOut)
		}
	}
}

func TestSampleRandomTokensIsTokenExact(t *testing.T) {
	for _, merge := range []bool{false, true} {
		tok := wordTokenizer{vocab: 1000, special: 990, merge: merge}
		c := DefaultConfig()
		c.NumPrompts, c.RandomInputLen, c.RandomOutputLen, c.RandomRangeRatio, c.RandomPrefixLen = 50, 200, 20, 0.2, 16
		ds, err := SampleRandomTokens(&c, tok)
		if err != nil {
			t.Fatal(err)
		}
		if !ds.Exact || ds.TokenMismatch != 0 {
			t.Errorf("merge %v: exact %v mismatch %d", merge, ds.Exact, ds.TokenMismatch)
		}
		var prefix string
		for i, r := range ds.Requests {
			ids := tok.Encode(r.Prompt)
			if len(ids) != r.PromptLen || r.PromptLen < 16+160 || r.PromptLen > 16+240 {
				t.Fatalf("merge %v request %d: %d tokens, PromptLen %d", merge, i, len(ids), r.PromptLen)
			}
			for _, id := range ids {
				if tok.IsSpecial(id) {
					t.Fatalf("special token %d in prompt", id)
				}
			}
			p := strings.Join(strings.Fields(r.Prompt)[:8], " ")
			if i == 0 {
				prefix = p
			} else if !merge && p != prefix {
				t.Errorf("request %d does not share the random prefix", i)
			}
			if r.OutputLen < 16 || r.OutputLen > 24 {
				t.Errorf("output len %d outside [16, 24]", r.OutputLen)
			}
		}
		again, _ := SampleRandomTokens(&c, tok)
		if again.Requests[7].Prompt != ds.Requests[7].Prompt {
			t.Error("same seed must give the same prompts")
		}
	}
}

func TestSampleRandomTextScalesWords(t *testing.T) {
	c := DefaultConfig()
	c.NumPrompts, c.RandomInputLen, c.RandomOutputLen = 10, 300, 5
	for _, tpw := range []float64{1, 1.5, 0.8} {
		ds := SampleRandomText(&c, tpw)
		for _, r := range ds.Requests {
			words := len(strings.Fields(r.Prompt))
			if want := int(math.Round(300 / tpw)); words != want || r.PromptLen != 300 {
				t.Errorf("tokens/word %g: %d words (want %d), PromptLen %d", tpw, words, want, r.PromptLen)
			}
		}
		if ds.Requests[0].Prompt == ds.Requests[1].Prompt {
			t.Error("prompts must differ")
		}
	}
}

func TestShareGPTAndCustom(t *testing.T) {
	dir := t.TempDir()
	long := strings.Repeat("x ", 2000)
	sg := filepath.Join(dir, "sg.json")
	os.WriteFile(sg, []byte(`[
	 {"conversations":[{"from":"human","value":"w1 w2 w3 w4 w5"},{"from":"gpt","value":"w1 w2 w3 w4 w5 w6"}]},
	 {"conversations":[{"from":"human","value":"w1 w2"},{"from":"gpt","value":"w1 w2 w3 w4 w5 w6"}]},
	 {"conversations":[{"from":"human","value":"`+long+`"},{"from":"gpt","value":"w1 w2 w3 w4"}]},
	 {"conversations":[{"from":"human","value":"only one turn"}]}
	]`), 0o644)
	tok := wordTokenizer{vocab: 100, special: 100}
	c := DefaultConfig()
	c.DatasetName, c.DatasetPath, c.NumPrompts = "sharegpt", sg, 3
	ds, err := SampleShareGPT(&c, tok)
	if err != nil {
		t.Fatal(err)
	}
	// Only the first conversation passes vLLM's filter; it is oversampled to 3.
	for _, r := range ds.Requests {
		if r.PromptLen != 5 || r.OutputLen != 6 {
			t.Errorf("request %+v", r)
		}
	}
	c.SharegptOutputLen = 2
	if ds, _ = SampleShareGPT(&c, tok); ds.Requests[0].OutputLen != 2 {
		t.Errorf("--sharegpt-output-len ignored: %+v", ds.Requests[0])
	}

	cj := filepath.Join(dir, "c.jsonl")
	os.WriteFile(cj, []byte("{\"prompt\":\"w1 w2 w3\"}\n\n{\"prompt\":\"w4\"}\n"), 0o644)
	c = DefaultConfig()
	c.DatasetName, c.DatasetPath, c.NumPrompts, c.CustomOutputLen = "custom", cj, 2, 9
	ds, err = SampleCustom(&c, tok)
	if err != nil || len(ds.Requests) != 2 || ds.Requests[0].OutputLen != 9 {
		t.Fatalf("custom: %+v %v", ds, err)
	}
	if got := ds.Requests[0].PromptLen + ds.Requests[1].PromptLen; got != 4 {
		t.Errorf("prompt lengths sum %d, want 4", got)
	}

	for name, body := range map[string]string{
		"bad.jsonl":   "{\"prompt\": \n",
		"nokey.jsonl": "{\"text\":\"a\"}\n",
	} {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(body), 0o644)
		c.DatasetPath = p
		if _, err := SampleCustom(&c, tok); err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: error %v should name the file", name, err)
		}
	}
	c.DatasetPath = filepath.Join(dir, "missing.json")
	if _, err := SampleShareGPT(&c, tok); err == nil {
		t.Error("missing file must fail")
	}
}

package chat

import (
	"encoding/json"
	"os"
	"testing"
)

// jinja_golden.json holds random conversations (every role, content parts,
// reasoning_content and <think> in content, tool calls with nested argument
// JSON, tools, all kinds of enable_thinking values) with the text jinja2
// renders for them from GLM-4.5's chat_template.jinja under transformers'
// settings: a differential test beyond the fixture's 12 cases.
func TestJinjaGolden(t *testing.T) {
	data, err := os.ReadFile("testdata/jinja_golden.json")
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		Cases []fixtureCase `json:"cases"`
	}
	if err := json.Unmarshal(data, &f); err != nil {
		t.Fatal(err)
	}
	if len(f.Cases) < 200 {
		t.Fatalf("golden file has only %d cases", len(f.Cases))
	}
	failures := 0
	for i, c := range f.Cases {
		got, err := Render(c.Messages, c.Tools, Options{AddGenerationPrompt: c.AddGenerationPrompt, Kwargs: c.Kwargs})
		if err != nil || got != c.Text {
			if failures++; failures <= 5 {
				t.Errorf("case %d: err %v\n got %q\nwant %q", i, err, got, c.Text)
			}
		}
	}
}

package chat

import (
	"encoding/json"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/serve/tokenizer"
)

const (
	chatFixture      = "../../testdata/text/chat/cases.json"
	tokenizerFixture = "../../testdata/text/tokenizer/tokenizer.json"
)

type fixtureCase struct {
	Messages            []Message      `json:"messages"`
	Tools               []Tool         `json:"tools"`
	AddGenerationPrompt bool           `json:"add_generation_prompt"`
	Kwargs              map[string]any `json:"kwargs"`
	Text                string         `json:"text"`
	IDs                 []int          `json:"ids"`
}

func readFixture(t *testing.T) []fixtureCase {
	t.Helper()
	data, err := os.ReadFile(chatFixture)
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		Cases []fixtureCase `json:"cases"`
	}
	if err := json.Unmarshal(data, &f); err != nil {
		t.Fatal(err)
	}
	return f.Cases
}

func loadTemplate(t *testing.T) *Template {
	t.Helper()
	tok, err := tokenizer.Load(tokenizerFixture)
	if err != nil {
		t.Fatal(err)
	}
	tmpl, err := NewTemplate(tok)
	if err != nil {
		t.Fatal(err)
	}
	return tmpl
}

func TestFixtureCases(t *testing.T) {
	cases := readFixture(t)
	if len(cases) != 12 {
		t.Fatalf("fixture has %d cases, want 12", len(cases))
	}
	tmpl := loadTemplate(t)
	for i, c := range cases {
		opt := Options{AddGenerationPrompt: c.AddGenerationPrompt, Kwargs: c.Kwargs}
		text, err := Render(c.Messages, c.Tools, opt)
		if err != nil {
			t.Errorf("case %d: %v", i, err)
			continue
		}
		if text != c.Text {
			t.Errorf("case %d text\n got %q\nwant %q", i, text, c.Text)
			continue
		}
		ids, err := tmpl.Encode(c.Messages, c.Tools, opt)
		if err != nil {
			t.Errorf("case %d: %v", i, err)
			continue
		}
		if !slices.Equal(ids, c.IDs) {
			t.Errorf("case %d ids\n got %v\nwant %v", i, ids, c.IDs)
		}
	}
}

// TestOpenAIWireForm decodes a request the way an OpenAI client sends it
// (arguments as a JSON string, content null next to tool calls) and checks it
// renders like the equivalent fixture conversation.
func TestOpenAIWireForm(t *testing.T) {
	const req = `{
	 "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
	 "messages": [
	  {"role": "user", "content": "Weather in Paris?"},
	  {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
	    "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 3, \"units\": [\"C\", \"F\"], \"ok\": true}"}}]},
	  {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "{\"temp\": 21}"}]},
	  {"role": "user", "content": "thanks"}]}`
	var r struct {
		Messages []Message `json:"messages"`
		Tools    []Tool    `json:"tools"`
	}
	if err := json.Unmarshal([]byte(req), &r); err != nil {
		t.Fatal(err)
	}
	if r.Messages[1].ToolCalls[0].ID != "call_1" || r.Messages[2].ToolCallID != "call_1" {
		t.Errorf("ids not kept: %+v", r.Messages)
	}
	if r.Tools[0].Function.Name != "get_weather" {
		t.Errorf("tool name = %q", r.Tools[0].Function.Name)
	}
	got, err := Render(r.Messages, r.Tools, Options{AddGenerationPrompt: true})
	if err != nil {
		t.Fatal(err)
	}
	want := readFixture(t)[8].Text
	if got != want {
		t.Errorf("got %q\nwant %q", got, want)
	}
}

func TestRenderDetails(t *testing.T) {
	no, yes := false, true
	tests := []struct {
		name  string
		msgs  []Message
		tools []Tool
		opt   Options
		want  string
	}{
		{
			name: "EnableThinking overrides kwargs",
			msgs: []Message{{Role: "user", Content: "hi"}},
			opt:  Options{AddGenerationPrompt: true, EnableThinking: &no, Kwargs: map[string]any{"enable_thinking": true}},
			want: "[gMASK]<sop><|user|>\nhi/nothink<|assistant|>\n<think></think>",
		},
		{
			name: "enable_thinking true changes nothing",
			msgs: []Message{{Role: "user", Content: "hi"}},
			opt:  Options{AddGenerationPrompt: true, EnableThinking: &yes},
			want: "[gMASK]<sop><|user|>\nhi<|assistant|>",
		},
		{
			name: "kwargs enable_thinking null counts as false",
			msgs: []Message{{Role: "user", Content: "hi"}},
			opt:  Options{Kwargs: map[string]any{"enable_thinking": nil}},
			want: "[gMASK]<sop><|user|>\nhi/nothink",
		},
		{
			name: "explicit empty reasoning keeps <think> in content",
			msgs: []Message{{Role: "user", Content: "q"}, {Role: "assistant", Content: "<think>x</think>y", HasReasoningContent: true}},
			want: "[gMASK]<sop><|user|>\nq<|assistant|>\n<think></think>\n<think>x</think>y",
		},
		{
			name: "nested think tags take the last opening",
			msgs: []Message{{Role: "user", Content: "q"}, {Role: "assistant", Content: "<think>a<think>\n\nb\n</think>\n\n c </think>d"}},
			want: "[gMASK]<sop><|user|>\nq<|assistant|>\n<think>b</think>\nd",
		},
		{
			name: "reasoning is stripped with Python whitespace",
			msgs: []Message{{Role: "user", Content: "q"}, {Role: "assistant", Content: "\u3000 a \x1c", ReasoningContent: " \x1fr\u00a0"}},
			want: "[gMASK]<sop><|user|>\nq<|assistant|>\n<think>r</think>\na",
		},
		{
			name: "developer renders as system; tool first gets observation",
			msgs: []Message{{Role: "developer", Content: "d"}, {Role: "tool", Content: "t"}},
			want: "[gMASK]<sop><|system|>\nd<|observation|>\n<tool_response>\nt\n</tool_response>",
		},
		{
			name:  "tool built in Go",
			msgs:  []Message{{Role: "user", Content: "x"}},
			tools: []Tool{{Function: FunctionDef{Name: "f", Description: "d<", Parameters: json.RawMessage(`{"type":"object"}`)}}},
			want: "[gMASK]<sop><|system|>\n" + toolsHeader +
				`{"type": "function", "function": {"name": "f", "description": "d<", "parameters": {"type": "object"}}}` +
				"\n" + toolsFooter + "<|user|>\nx",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Render(tt.msgs, tt.tools, tt.opt)
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("got  %q\nwant %q", got, tt.want)
			}
		})
	}
}

// TestArgumentJSONLikePython: non-string argument values are written as
// Python's json.dumps(ensure_ascii=False) writes them (separators, float
// repr, escapes, key order, repeated keys); string values are written raw.
// The expected text was rendered by jinja2 with transformers' tojson.
func TestArgumentJSONLikePython(t *testing.T) {
	const args = `{"b":1,"obj":{"z":1.0,"a":[1e16,0.00001,-0.0,12345678901234567890,1.5e300,0.1,100.0,1e22,-0,1E2,2.50],"s":"é\u2028\n<&>\"q\\\u007f\u0001"},"a":"<raw \"str\">","n":null,"b":2}`
	const wantJSON = `"[gMASK]<sop><|assistant|>\n<think></think>\n<tool_call>f\n<arg_key>b</arg_key>\n<arg_value>2</arg_value>\n<arg_key>obj</arg_key>\n<arg_value>{\"z\": 1.0, \"a\": [1e+16, 1e-05, -0.0, 12345678901234567890, 1.5e+300, 0.1, 100.0, 1e+22, 0, 100.0, 2.5], \"s\": \"\u00e9\u2028\\n<&>\\\"q\\\\\u007f\\u0001\"}</arg_value>\n<arg_key>a</arg_key>\n<arg_value><raw \"str\"></arg_value>\n<arg_key>n</arg_key>\n<arg_value>null</arg_value>\n</tool_call>"`
	var want string
	if err := json.Unmarshal([]byte(wantJSON), &want); err != nil {
		t.Fatal(err)
	}
	got, err := Render([]Message{{Role: "assistant", ToolCalls: []ToolCall{{Function: FunctionCall{Name: "f", Arguments: args}}}}}, nil, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Errorf("got  %q\nwant %q", got, want)
	}
}

func TestRenderErrors(t *testing.T) {
	tests := []struct {
		name  string
		msgs  []Message
		tools []Tool
		want  string
	}{
		{"unknown role", []Message{{Role: "robot", Content: "x"}}, nil, "unknown role"},
		{"arguments not JSON", []Message{{Role: "assistant", ToolCalls: []ToolCall{{Function: FunctionCall{Name: "f", Arguments: "{city: Paris}"}}}}}, nil, "not valid JSON"},
		{"arguments not an object", []Message{{Role: "assistant", ToolCalls: []ToolCall{{Function: FunctionCall{Name: "f", Arguments: "[1]"}}}}}, nil, "JSON object"},
		{"trailing garbage", []Message{{Role: "assistant", ToolCalls: []ToolCall{{Function: FunctionCall{Name: "f", Arguments: `{"a":1} x`}}}}}, nil, "not valid JSON"},
		{"deep nesting", []Message{{Role: "assistant", ToolCalls: []ToolCall{{Function: FunctionCall{Name: "f", Arguments: `{"a":` + strings.Repeat("[", 5000) + strings.Repeat("]", 5000) + "}"}}}}}, nil, "deeper"},
		{"bad tool JSON", []Message{{Role: "user"}}, []Tool{{Raw: []byte(`{"type":`)}}, "tool 0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Render(tt.msgs, tt.tools, Options{})
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err = %v, want one containing %q", err, tt.want)
			}
		})
	}
}

func TestEmptyArgumentsMeanNone(t *testing.T) {
	got, err := Render([]Message{{Role: "assistant", ToolCalls: []ToolCall{{Function: FunctionCall{Name: "f"}}}}}, nil, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if want := "[gMASK]<sop><|assistant|>\n<think></think>\n<tool_call>f\n</tool_call>"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

func TestTemplateNeedsSpecialTokens(t *testing.T) {
	data, err := os.ReadFile(tokenizerFixture)
	if err != nil {
		t.Fatal(err)
	}
	var f map[string]any
	if err := json.Unmarshal(data, &f); err != nil {
		t.Fatal(err)
	}
	var kept []any
	for _, a := range f["added_tokens"].([]any) {
		if a.(map[string]any)["content"] != "<|observation|>" {
			kept = append(kept, a)
		}
	}
	f["added_tokens"] = kept
	data, _ = json.Marshal(f)
	tok, err := tokenizer.FromJSON(data)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewTemplate(tok); err == nil || !strings.Contains(err.Error(), "<|observation|>") {
		t.Errorf("NewTemplate without <|observation|>: err = %v", err)
	}
	tmpl := loadTemplate(t)
	var stops []string
	for _, id := range tmpl.StopIDs() {
		s, _ := tmpl.tok.TokenText(id)
		stops = append(stops, s)
	}
	if want := []string{"<|endoftext|>", "<|user|>", "<|observation|>"}; !slices.Equal(stops, want) {
		t.Errorf("StopIDs = %v, want %v", stops, want)
	}
}

// TestDeliberateDeviations pins the two places where Render follows vLLM's
// message preprocessing rather than raw jinja2: null content renders as empty
// (jinja2 would print "None"), and a tool result given as parts renders as
// their text (jinja2 would print each part's Python repr).
func TestDeliberateDeviations(t *testing.T) {
	const req = `[{"role":"user","content":"q"},
	 {"role":"assistant","content":null,"tool_calls":[{"function":{"name":"f","arguments":"{}"}}]},
	 {"role":"tool","content":[{"type":"text","text":"r"}]}]`
	var msgs []Message
	if err := json.Unmarshal([]byte(req), &msgs); err != nil {
		t.Fatal(err)
	}
	got, err := Render(msgs, nil, Options{})
	if err != nil {
		t.Fatal(err)
	}
	want := "[gMASK]<sop><|user|>\nq<|assistant|>\n<think></think>\n<tool_call>f\n</tool_call>" +
		"<|observation|>\n<tool_response>\nr\n</tool_response>"
	if got != want {
		t.Errorf("got  %q\nwant %q", got, want)
	}
}

package chat

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

func TestMessageUnmarshal(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want Message
	}{
		{"string content", `{"role":"user","content":"hi"}`, Message{Role: "user", Content: "hi"}},
		{"null content", `{"role":"assistant","content":null}`, Message{Role: "assistant"}},
		{"missing content", `{"role":"assistant"}`, Message{Role: "assistant"}},
		{"text parts joined without separator", `{"role":"user","content":[{"type":"text","text":"a "},"b",{"type":"text","text":"c"}]}`,
			Message{Role: "user", Content: "a bc"}},
		{"empty parts", `{"role":"user","content":[]}`, Message{Role: "user"}},
		{"reasoning", `{"role":"assistant","content":"x","reasoning_content":"r"}`,
			Message{Role: "assistant", Content: "x", ReasoningContent: "r", HasReasoningContent: true}},
		{"empty reasoning is still given", `{"role":"assistant","reasoning_content":""}`,
			Message{Role: "assistant", HasReasoningContent: true}},
		{"null reasoning is absent", `{"role":"assistant","reasoning_content":null}`, Message{Role: "assistant"}},
		{"tool result", `{"role":"tool","tool_call_id":"c1","name":"f","content":"42"}`,
			Message{Role: "tool", Content: "42", ToolCallID: "c1", Name: "f"}},
		{"OpenAI tool call", `{"role":"assistant","tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"a\": 1}"}}]}`,
			Message{Role: "assistant", ToolCalls: []ToolCall{{ID: "c1", Type: "function", Function: FunctionCall{Name: "f", Arguments: `{"a": 1}`}}}}},
		{"arguments as an object", `{"role":"assistant","tool_calls":[{"function":{"name":"f","arguments":{"b": [1, 2], "a": 1}}}]}`,
			Message{Role: "assistant", ToolCalls: []ToolCall{{Type: "function", Function: FunctionCall{Name: "f", Arguments: `{"b": [1, 2], "a": 1}`}}}}},
		{"flat tool call", `{"role":"assistant","tool_calls":[{"name":"f","arguments":{}}]}`,
			Message{Role: "assistant", ToolCalls: []ToolCall{{Type: "function", Function: FunctionCall{Name: "f", Arguments: `{}`}}}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var m Message
			if err := json.Unmarshal([]byte(tt.in), &m); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(m, tt.want) {
				t.Errorf("got  %+v\nwant %+v", m, tt.want)
			}
			// Marshal gives OpenAI's form, which decodes to the same message.
			out, err := json.Marshal(m)
			if err != nil {
				t.Fatal(err)
			}
			var back Message
			if err := json.Unmarshal(out, &back); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(back, m) {
				t.Errorf("round trip through %s gave %+v", out, back)
			}
		})
	}
}

func TestMessageUnmarshalErrors(t *testing.T) {
	tests := []struct{ name, in, want string }{
		{"image part", `{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}`, `type "image_url"`},
		{"object content", `{"role":"user","content":{"text":"x"}}`, "content must be"},
		{"number content", `{"role":"user","content":5}`, "content must be"},
		{"bad part", `{"role":"user","content":[5]}`, "content part 0"},
		{"reasoning not a string", `{"role":"assistant","reasoning_content":5}`, "reasoning_content"},
		{"not an object", `[]`, "chat message"},
		{"tool calls not a list", `{"role":"assistant","tool_calls":{}}`, "chat message"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var m Message
			err := json.Unmarshal([]byte(tt.in), &m)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err = %v, want one containing %q", err, tt.want)
			}
		})
	}
}

func TestToolKeepsRawJSON(t *testing.T) {
	const in = `{"type": "function", "function": {"parameters": {"z": 1, "a": 2}, "name": "f", "description": "d"}, "x-extra": true}`
	var tool Tool
	if err := json.Unmarshal([]byte(in), &tool); err != nil {
		t.Fatal(err)
	}
	if tool.Type != "function" || tool.Function.Name != "f" || tool.Function.Description != "d" ||
		string(tool.Function.Parameters) != `{"z": 1, "a": 2}` {
		t.Errorf("parsed %+v", tool)
	}
	out, err := json.Marshal(tool)
	if err != nil {
		t.Fatal(err)
	}
	if string(out) != `{"type":"function","function":{"parameters":{"z":1,"a":2},"name":"f","description":"d"},"x-extra":true}` {
		t.Errorf("marshal = %s", out) // encoding/json compacts RawMessage output
	}
	got, err := Render(nil, []Tool{tool}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"type": "function", "function": {"parameters": {"z": 1, "a": 2}, "name": "f", "description": "d"}, "x-extra": true}`; !strings.Contains(got, "\n"+want+"\n") {
		t.Errorf("rendered tools block lacks %s:\n%s", want, got)
	}
}

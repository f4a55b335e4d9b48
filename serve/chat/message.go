package chat

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// Message is one chat message. Its JSON form is OpenAI's chat message.
type Message struct {
	Role string // system, user, assistant or tool ("developer" renders as system)
	// Content is the message text. Content given as a list of parts is joined
	// as the template joins it: the text of each text part, no separator.
	Content string
	// ReasoningContent is an assistant turn's reasoning. When it is set (or
	// HasReasoningContent is true, for an explicitly empty one) the template
	// uses it; otherwise it takes reasoning from a <think>…</think> in Content.
	ReasoningContent    string
	HasReasoningContent bool
	ToolCalls           []ToolCall
	ToolCallID          string
	Name                string
}

// ToolCall is a function call made by the assistant.
type ToolCall struct {
	ID       string
	Type     string // "function"
	Function FunctionCall
}

// FunctionCall names the function and carries its arguments.
type FunctionCall struct {
	Name string
	// Arguments is a JSON object as text, as OpenAI sends it. JSON that
	// arrives as an object instead of a string is kept as its text.
	Arguments string
}

// Tool is a tool the model may call. Raw keeps the JSON as the client sent
// it: the template prints the tool back verbatim (key order included).
type Tool struct {
	Type     string
	Function FunctionDef
	Raw      json.RawMessage
}

// FunctionDef describes a callable function.
type FunctionDef struct {
	Name        string
	Description string
	Parameters  json.RawMessage
}

type messageJSON struct {
	Role             string          `json:"role"`
	Content          json.RawMessage `json:"content"`
	ReasoningContent json.RawMessage `json:"reasoning_content"`
	ToolCalls        []ToolCall      `json:"tool_calls"`
	ToolCallID       string          `json:"tool_call_id"`
	Name             string          `json:"name"`
}

// UnmarshalJSON accepts OpenAI's message JSON: content as a string, null, or
// a list of parts ({"type":"text","text":...} or plain strings). Parts that
// are not text (images, audio) are an error: this is a text-only model, and
// dropping them silently would answer a different question.
func (m *Message) UnmarshalJSON(data []byte) error {
	var j messageJSON
	if err := json.Unmarshal(data, &j); err != nil {
		return fmt.Errorf("chat message: %w", err)
	}
	content, err := contentText(j.Content)
	if err != nil {
		return fmt.Errorf("chat message (role %q): %w", j.Role, err)
	}
	*m = Message{Role: j.Role, Content: content, ToolCalls: j.ToolCalls, ToolCallID: j.ToolCallID, Name: j.Name}
	if !isJSONNull(j.ReasoningContent) {
		if err := json.Unmarshal(j.ReasoningContent, &m.ReasoningContent); err != nil {
			return fmt.Errorf("chat message reasoning_content: want a string: %w", err)
		}
		m.HasReasoningContent = true
	}
	return nil
}

// MarshalJSON writes the OpenAI form, so messages round-trip.
func (m Message) MarshalJSON() ([]byte, error) {
	type out struct {
		Role             string     `json:"role"`
		Content          *string    `json:"content"`
		ReasoningContent *string    `json:"reasoning_content,omitempty"`
		ToolCalls        []ToolCall `json:"tool_calls,omitempty"`
		ToolCallID       string     `json:"tool_call_id,omitempty"`
		Name             string     `json:"name,omitempty"`
	}
	o := out{Role: m.Role, Content: &m.Content, ToolCalls: m.ToolCalls, ToolCallID: m.ToolCallID, Name: m.Name}
	if m.HasReasoningContent || m.ReasoningContent != "" {
		o.ReasoningContent = &m.ReasoningContent
	}
	return json.Marshal(o)
}

func isJSONNull(raw json.RawMessage) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) == 0 || string(raw) == "null"
}

// contentText flattens message content the way the template's visible_text
// macro does.
func contentText(raw json.RawMessage) (string, error) {
	raw = bytes.TrimSpace(raw)
	if isJSONNull(raw) {
		return "", nil
	}
	switch raw[0] {
	case '"':
		var s string
		err := json.Unmarshal(raw, &s)
		return s, err
	case '[':
		var parts []json.RawMessage
		if err := json.Unmarshal(raw, &parts); err != nil {
			return "", fmt.Errorf("content parts: %w", err)
		}
		var b strings.Builder
		for i, p := range parts {
			p = bytes.TrimSpace(p)
			if len(p) > 0 && p[0] == '"' {
				var s string
				if err := json.Unmarshal(p, &s); err != nil {
					return "", fmt.Errorf("content part %d: %w", i, err)
				}
				b.WriteString(s)
				continue
			}
			var part struct {
				Type string `json:"type"`
				Text string `json:"text"`
			}
			if err := json.Unmarshal(p, &part); err != nil {
				return "", fmt.Errorf("content part %d: %w", i, err)
			}
			if part.Type != "text" {
				return "", fmt.Errorf("content part %d has type %q; only text is supported", i, part.Type)
			}
			b.WriteString(part.Text)
		}
		return b.String(), nil
	}
	return "", errors.New("content must be a string, null, or a list of parts")
}

type toolCallJSON struct {
	ID       string `json:"id"`
	Type     string `json:"type"`
	Function *struct {
		Name      string          `json:"name"`
		Arguments json.RawMessage `json:"arguments"`
	} `json:"function"`
	// Some clients send the function fields at the top level.
	Name      string          `json:"name"`
	Arguments json.RawMessage `json:"arguments"`
}

// UnmarshalJSON accepts OpenAI's tool call; arguments may be a JSON string
// (OpenAI) or a JSON object (Hugging Face's convention).
func (tc *ToolCall) UnmarshalJSON(data []byte) error {
	var j toolCallJSON
	if err := json.Unmarshal(data, &j); err != nil {
		return fmt.Errorf("tool call: %w", err)
	}
	name, args := j.Name, j.Arguments
	if j.Function != nil {
		name, args = j.Function.Name, j.Function.Arguments
	}
	*tc = ToolCall{ID: j.ID, Type: j.Type, Function: FunctionCall{Name: name}}
	if tc.Type == "" {
		tc.Type = "function"
	}
	args = bytes.TrimSpace(args)
	switch {
	case isJSONNull(args):
	case args[0] == '"':
		if err := json.Unmarshal(args, &tc.Function.Arguments); err != nil {
			return fmt.Errorf("tool call %q arguments: %w", name, err)
		}
	default:
		tc.Function.Arguments = string(args)
	}
	return nil
}

// MarshalJSON writes OpenAI's form (arguments as a string).
func (tc ToolCall) MarshalJSON() ([]byte, error) {
	type fn struct {
		Name      string `json:"name"`
		Arguments string `json:"arguments"`
	}
	return json.Marshal(struct {
		ID       string `json:"id,omitempty"`
		Type     string `json:"type"`
		Function fn     `json:"function"`
	}{tc.ID, tc.Type, fn{tc.Function.Name, tc.Function.Arguments}})
}

// UnmarshalJSON keeps the tool's raw JSON next to its parsed fields.
func (t *Tool) UnmarshalJSON(data []byte) error {
	var j struct {
		Type     string `json:"type"`
		Function *struct {
			Name        string          `json:"name"`
			Description string          `json:"description"`
			Parameters  json.RawMessage `json:"parameters"`
		} `json:"function"`
	}
	if err := json.Unmarshal(data, &j); err != nil {
		return fmt.Errorf("tool: %w", err)
	}
	*t = Tool{Type: j.Type, Raw: append(json.RawMessage(nil), data...)}
	if j.Function != nil {
		t.Function = FunctionDef{Name: j.Function.Name, Description: j.Function.Description, Parameters: j.Function.Parameters}
	}
	return nil
}

// MarshalJSON writes Raw when present, else the fields.
func (t Tool) MarshalJSON() ([]byte, error) {
	if len(t.Raw) > 0 {
		return t.Raw, nil
	}
	return []byte(t.canonicalJSON()), nil
}

// canonicalJSON builds the tool's JSON from its fields (for tools made in Go
// rather than decoded), in OpenAI's key order.
func (t Tool) canonicalJSON() string {
	var b strings.Builder
	typ := t.Type
	if typ == "" {
		typ = "function"
	}
	name, _ := json.Marshal(t.Function.Name)
	tj, _ := json.Marshal(typ)
	fmt.Fprintf(&b, `{"type":%s,"function":{"name":%s`, tj, name)
	if t.Function.Description != "" {
		d, _ := json.Marshal(t.Function.Description)
		fmt.Fprintf(&b, `,"description":%s`, d)
	}
	if !isJSONNull(t.Function.Parameters) {
		fmt.Fprintf(&b, `,"parameters":%s`, t.Function.Parameters)
	}
	b.WriteString("}}")
	return b.String()
}

// Package chat renders GLM-4.5's chat template natively: the text it
// produces is byte-identical to transformers' apply_chat_template with the
// model's chat_template.jinja, so a prompt tokenizes to the same ids.
package chat

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"unicode"

	"github.com/glmtopo/glmtopo/serve/tokenizer"
)

// Options are apply_chat_template's arguments besides messages and tools.
type Options struct {
	AddGenerationPrompt bool
	// EnableThinking, when set, overrides Kwargs["enable_thinking"]. Thinking
	// is disabled only when it is given and false: the template appends
	// "/nothink" to user turns and pre-fills an empty <think></think>.
	EnableThinking *bool
	Kwargs         map[string]any // chat_template_kwargs; the template reads enable_thinking
}

// Special-token texts the template writes. A Template checks them against its
// tokenizer, so a tokenizer that spells them differently fails loudly.
const (
	tokGMask       = "[gMASK]"
	tokSop         = "<sop>"
	tokSystem      = "<|system|>"
	tokUser        = "<|user|>"
	tokAssistant   = "<|assistant|>"
	tokObservation = "<|observation|>"
	tokThink       = "<think>"
	tokEndThink    = "</think>"
	tokToolCall    = "<tool_call>"
	tokEndToolCall = "</tool_call>"
	tokToolResp    = "<tool_response>"
	tokEndToolResp = "</tool_response>"
	tokArgKey      = "<arg_key>"
	tokEndArgKey   = "</arg_key>"
	tokArgValue    = "<arg_value>"
	tokEndArgValue = "</arg_value>"
	tokNoThink     = "/nothink"
	tokEndOfText   = "<|endoftext|>"
)

var templateTokens = []string{tokGMask, tokSop, tokSystem, tokUser, tokAssistant, tokObservation, tokThink,
	tokEndThink, tokToolCall, tokEndToolCall, tokToolResp, tokEndToolResp, tokArgKey, tokEndArgKey, tokArgValue,
	tokEndArgValue, tokNoThink}

// toolsPreamble is the system block the template writes when tools are given;
// the tools' JSON goes between its two halves, one per line.
const (
	toolsHeader = "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n" +
		"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
	toolsFooter = "</tools>\n\nFor each function call, output the function name and arguments within the following XML format:\n" +
		tokToolCall + "{function-name}\n" +
		tokArgKey + "{arg-key-1}" + tokEndArgKey + "\n" + tokArgValue + "{arg-value-1}" + tokEndArgValue + "\n" +
		tokArgKey + "{arg-key-2}" + tokEndArgKey + "\n" + tokArgValue + "{arg-value-2}" + tokEndArgValue + "\n" +
		"...\n" + tokEndToolCall
)

// Template is GLM-4.5's chat template bound to a tokenizer whose special
// tokens it has checked.
type Template struct {
	tok  *tokenizer.Tokenizer
	stop []int
}

// NewTemplate checks that every special token the template writes is a single
// special token of tok.
func NewTemplate(tok *tokenizer.Tokenizer) (*Template, error) {
	for _, s := range templateTokens {
		id, ok := tok.TokenID(s)
		if !ok {
			return nil, fmt.Errorf("chat template: tokenizer has no %q token", s)
		}
		if text, _ := tok.TokenText(id); text != s || !tok.IsSpecial(id) {
			return nil, fmt.Errorf("chat template: %q (id %d) is not a special token", s, id)
		}
	}
	t := &Template{tok: tok}
	// A GLM-4.5 turn ends when the model starts the next speaker's turn.
	for _, s := range []string{tokEndOfText, tokUser, tokObservation} {
		if id, ok := tok.TokenID(s); ok {
			t.stop = append(t.stop, id)
		}
	}
	return t, nil
}

// Render is the package-level Render.
func (t *Template) Render(msgs []Message, tools []Tool, opt Options) (string, error) {
	return Render(msgs, tools, opt)
}

// Encode renders the conversation and tokenizes it (special tokens in the
// rendered text become their ids).
func (t *Template) Encode(msgs []Message, tools []Tool, opt Options) ([]int, error) {
	text, err := Render(msgs, tools, opt)
	if err != nil {
		return nil, err
	}
	return t.tok.Encode(text), nil
}

// StopIDs are the ids that end an assistant turn: <|endoftext|>, <|user|> and
// <|observation|> (the model emits the latter to hand over to a tool).
func (t *Template) StopIDs() []int { return append([]int(nil), t.stop...) }

// Render renders a conversation with GLM-4.5's chat template, byte-identical
// to transformers' apply_chat_template. Unknown roles and tool calls whose
// arguments are not a JSON object are errors.
func Render(msgs []Message, tools []Tool, opt Options) (string, error) {
	noThink, err := thinkingDisabled(opt)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	b.WriteString(tokGMask + tokSop)
	if len(tools) > 0 {
		b.WriteString(tokSystem + "\n" + toolsHeader)
		for i, tool := range tools {
			raw := string(tool.Raw)
			if len(tool.Raw) == 0 {
				raw = tool.canonicalJSON()
			}
			v, err := parseJSON([]byte(raw))
			if err != nil {
				return "", fmt.Errorf("tool %d: invalid JSON: %w", i, err)
			}
			v.writePython(&b)
			b.WriteByte('\n')
		}
		b.WriteString(toolsFooter)
	}
	lastUser := -1
	for i, m := range msgs {
		if m.Role == "user" {
			lastUser = i
		}
	}
	for i, m := range msgs {
		switch role(m) {
		case "user":
			b.WriteString(tokUser + "\n" + m.Content)
			if noThink && !strings.HasSuffix(m.Content, tokNoThink) {
				b.WriteString(tokNoThink)
			}
		case "assistant":
			if err := renderAssistant(&b, m, i > lastUser); err != nil {
				return "", fmt.Errorf("message %d: %w", i, err)
			}
		case "tool":
			if i == 0 || role(msgs[i-1]) != "tool" {
				b.WriteString(tokObservation)
			}
			b.WriteString("\n" + tokToolResp + "\n" + m.Content + "\n" + tokEndToolResp)
		case "system":
			b.WriteString(tokSystem + "\n" + m.Content)
		default:
			return "", fmt.Errorf("message %d: unknown role %q (want system, user, assistant or tool)", i, m.Role)
		}
	}
	if opt.AddGenerationPrompt {
		b.WriteString(tokAssistant)
		if noThink {
			b.WriteString("\n" + tokThink + tokEndThink)
		}
	}
	return b.String(), nil
}

// role maps OpenAI's "developer" role to "system" (the template knows only
// the latter; dropping a developer prompt silently would be worse).
func role(m Message) string {
	if m.Role == "developer" {
		return "system"
	}
	return m.Role
}

func renderAssistant(b *strings.Builder, m Message, afterLastUser bool) error {
	b.WriteString(tokAssistant)
	content, reasoning := m.Content, ""
	if m.HasReasoningContent || m.ReasoningContent != "" {
		reasoning = m.ReasoningContent
	} else if strings.Contains(content, tokEndThink) {
		// content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n')
		before, _, _ := strings.Cut(content, tokEndThink)
		before = strings.TrimRight(before, "\n")
		if k := strings.LastIndex(before, tokThink); k >= 0 {
			before = before[k+len(tokThink):]
		}
		reasoning = strings.TrimLeft(before, "\n")
		content = strings.TrimLeft(content[strings.LastIndex(content, tokEndThink)+len(tokEndThink):], "\n")
	}
	if afterLastUser && reasoning != "" {
		b.WriteString("\n" + tokThink + pyStrip(reasoning) + tokEndThink)
	} else {
		b.WriteString("\n" + tokThink + tokEndThink)
	}
	if c := pyStrip(content); c != "" {
		b.WriteString("\n" + c)
	}
	for i, tc := range m.ToolCalls {
		args, err := parseArguments(tc.Function.Arguments)
		if err != nil {
			return fmt.Errorf("tool call %d (%q): %w", i, tc.Function.Name, err)
		}
		b.WriteString("\n" + tokToolCall + tc.Function.Name + "\n")
		for k, key := range args.keys {
			b.WriteString(tokArgKey + key + tokEndArgKey + "\n" + tokArgValue)
			if v := &args.values[k]; v.kind == jsonString {
				b.WriteString(v.str) // strings are written raw, not as JSON
			} else {
				v.writePython(b)
			}
			b.WriteString(tokEndArgValue + "\n")
		}
		b.WriteString(tokEndToolCall)
	}
	return nil
}

// parseArguments reads a tool call's arguments, which the template iterates
// as a mapping; empty arguments mean no arguments.
func parseArguments(args string) (jsonValue, error) {
	if strings.TrimSpace(args) == "" {
		return jsonValue{kind: jsonObject}, nil
	}
	v, err := parseJSON([]byte(args))
	if err != nil {
		return jsonValue{}, fmt.Errorf("arguments are not valid JSON: %w", err)
	}
	if v.kind != jsonObject {
		return jsonValue{}, errors.New("arguments must be a JSON object")
	}
	return v, nil
}

// thinkingDisabled evaluates the template's
// `enable_thinking is defined and not enable_thinking`.
func thinkingDisabled(opt Options) (bool, error) {
	if opt.EnableThinking != nil {
		return !*opt.EnableThinking, nil
	}
	v, defined := opt.Kwargs["enable_thinking"]
	if !defined {
		return false, nil
	}
	return !truthy(v), nil
}

// truthy is Python truthiness for values decoded from JSON.
func truthy(v any) bool {
	switch x := v.(type) {
	case nil:
		return false
	case bool:
		return x
	case string:
		return x != ""
	case float64:
		return x != 0
	case float32:
		return x != 0
	case int:
		return x != 0
	case int64:
		return x != 0
	case []any:
		return len(x) > 0
	case map[string]any:
		return len(x) > 0
	case json.Number:
		f, err := x.Float64()
		return err != nil || f != 0
	}
	return true
}

// pyStrip is Python's str.strip(): it trims Unicode whitespace, which for
// Python also includes the separators U+001C..U+001F.
func pyStrip(s string) string {
	return strings.TrimFunc(s, isPySpace)
}

func isPySpace(r rune) bool {
	if r >= 0x1C && r <= 0x1F {
		return true
	}
	return unicode.IsSpace(r)
}

// Package glm45 parses GLM-4.5 model output into OpenAI chat fields: the
// reasoning between <think> and </think> becomes reasoning_content, and
// <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value></tool_call>
// blocks become tool_calls. Parsing is incremental: a Parser is fed text
// deltas (from a streaming detokenizer) and returns deltas that never contain
// a partial tag, and the joined deltas equal the result of parsing the whole
// text at once (Parse is Feed + Finish).
//
// Whitespace rules (the chat template renders "\n<think>R</think>\nC\n<tool_call>"):
//   - reasoning is trimmed on both sides;
//   - leading whitespace of the content (at the start of the output and right
//     after </think>) is dropped;
//   - whitespace runs that touch a tool call (before, between, after) are dropped;
//   - all other text, including text after a tool call, is kept (vLLM drops
//     text after the first call; we keep it so no text is lost).
//
// Malformed markup never panics and never loses text outside recognised
// markup: a call to a function that is not among the request's tools (or one
// with no name) is passed through verbatim as content, because a client
// cannot execute a function it did not declare; an unclosed call at the end
// of the output (max_tokens reached) is closed with the arguments seen so
// far, because streaming clients have already received its name.
package glm45

import (
	"crypto/rand"
	"encoding/json"
	"strings"
)

// Tag strings of the GLM-4.5 output format.
const (
	ThinkStart    = "<think>"
	ThinkEnd      = "</think>"
	ToolCallStart = "<tool_call>"
	ToolCallEnd   = "</tool_call>"
	ArgKeyStart   = "<arg_key>"
	ArgKeyEnd     = "</arg_key>"
	ArgValueStart = "<arg_value>"
	ArgValueEnd   = "</arg_value>"
)

// Options selects what a Parser extracts.
type Options struct {
	// Reasoning enables the reasoning parser. With it off, <think> is plain text.
	Reasoning bool
	// ThinkingDisabled (enable_thinking=false): everything is content.
	ThinkingDisabled bool
	// StartInReasoning: the prompt already ends with <think>, so the output
	// begins inside the reasoning block.
	StartInReasoning bool
	// ToolCalls enables the tool-call parser.
	ToolCalls bool
	// Tools are the request's function declarations; calls to other names are
	// content. With no tools every name is accepted.
	Tools []Tool
	// NewID makes tool-call ids; nil uses NewCallID.
	NewID func() string
}

// Tool is the part of a function declaration the parser needs.
type Tool struct {
	Name string
	// Parameters is the JSON schema of the arguments (may be empty).
	Parameters json.RawMessage
}

// ToolCall is a complete parsed call; Arguments is a JSON object.
type ToolCall struct {
	ID        string
	Name      string
	Arguments string
}

// ToolCallDelta is one streamed piece of a tool call. The first delta of a
// call carries ID and Name; later ones carry argument fragments whose
// concatenation is the arguments JSON object.
type ToolCallDelta struct {
	Index     int
	ID        string
	Name      string
	Arguments string
}

// Delta is what one Feed or Finish produced.
type Delta struct {
	Content   string
	Reasoning string
	ToolCalls []ToolCallDelta
}

// Empty reports whether d carries nothing.
func (d Delta) Empty() bool {
	return d.Content == "" && d.Reasoning == "" && len(d.ToolCalls) == 0
}

// Result is a whole parsed output.
type Result struct {
	Content   string
	Reasoning string
	ToolCalls []ToolCall
}

// Parser is an incremental GLM-4.5 output parser. Not safe for concurrent use.
type Parser struct {
	reasoning *reasoningParser // nil when reasoning parsing is off
	tools     *toolParser      // nil when tool parsing is off
	finished  bool
}

// NewParser returns a parser for one model output.
func NewParser(opt Options) *Parser {
	p := &Parser{}
	if opt.Reasoning {
		p.reasoning = newReasoningParser(opt.ThinkingDisabled, opt.StartInReasoning)
	}
	if opt.ToolCalls {
		p.tools = newToolParser(opt.Tools, opt.NewID)
	}
	return p
}

// Feed parses the next piece of output text.
func (p *Parser) Feed(text string) Delta {
	if p.finished {
		return Delta{}
	}
	var d Delta
	content := text
	if p.reasoning != nil {
		d.Reasoning, content = p.reasoning.feed(text)
	}
	if p.tools != nil {
		p.tools.feed(content, &d)
	} else {
		d.Content += content
	}
	return d
}

// Finish flushes text held back at the end of the output. Later calls to
// Feed and Finish return nothing.
func (p *Parser) Finish() Delta {
	if p.finished {
		return Delta{}
	}
	p.finished = true
	var d Delta
	content := ""
	if p.reasoning != nil {
		d.Reasoning, content = p.reasoning.finish()
	}
	if p.tools != nil {
		p.tools.feed(content, &d)
		p.tools.finish(&d)
	} else {
		d.Content += content
	}
	return d
}

// CalledTools reports whether at least one tool call was emitted so far.
func (p *Parser) CalledTools() bool {
	return p.tools != nil && p.tools.calls > 0
}

// Parse parses a whole output.
func Parse(text string, opt Options) Result {
	p := NewParser(opt)
	var acc Accumulator
	acc.Add(p.Feed(text))
	acc.Add(p.Finish())
	return acc.Result()
}

// Accumulator joins deltas into a Result.
type Accumulator struct {
	content, reasoning strings.Builder
	calls              []ToolCall
	args               []strings.Builder
}

// Add appends one delta.
func (a *Accumulator) Add(d Delta) {
	a.content.WriteString(d.Content)
	a.reasoning.WriteString(d.Reasoning)
	for _, tc := range d.ToolCalls {
		for len(a.calls) <= tc.Index {
			a.calls = append(a.calls, ToolCall{})
			a.args = append(a.args, strings.Builder{})
		}
		if tc.ID != "" {
			a.calls[tc.Index].ID = tc.ID
		}
		if tc.Name != "" {
			a.calls[tc.Index].Name = tc.Name
		}
		a.args[tc.Index].WriteString(tc.Arguments)
	}
}

// Result returns everything added so far.
func (a *Accumulator) Result() Result {
	r := Result{Content: a.content.String(), Reasoning: a.reasoning.String()}
	for i, c := range a.calls {
		c.Arguments = a.args[i].String()
		r.ToolCalls = append(r.ToolCalls, c)
	}
	return r
}

// NewCallID returns an OpenAI-style tool call id, "call_" and 24 random
// alphanumerics.
func NewCallID() string {
	const alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
	var b [24]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return "call_" + string(b[:])
}

// findTag returns the earliest position in s of any of tags and that tag, or -1.
func findTag(s string, tags ...string) (int, string) {
	best, bestTag := -1, ""
	for _, t := range tags {
		if i := strings.Index(s, t); i >= 0 && (best < 0 || i < best) {
			best, bestTag = i, t
		}
	}
	return best, bestTag
}

// partialTagLen returns the length of the longest suffix of s that is a
// proper prefix of one of tags: text that must be held back until the next
// delta says whether it is a tag.
func partialTagLen(s string, tags ...string) int {
	longest := 0
	for _, t := range tags {
		n := min(len(t)-1, len(s))
		for ; n > longest; n-- {
			if strings.HasSuffix(s, t[:n]) {
				longest = n
				break
			}
		}
	}
	return longest
}

// isSpace reports whether b is ASCII whitespace (the only whitespace the
// trimming rules touch, so byte splits cannot change the result).
func isSpace(b byte) bool {
	return b == ' ' || b == '\n' || b == '\t' || b == '\r' || b == '\f' || b == '\v'
}

func trimSpace(s string) string {
	i, j := 0, len(s)
	for i < j && isSpace(s[i]) {
		i++
	}
	for j > i && isSpace(s[j-1]) {
		j--
	}
	return s[i:j]
}

// trailingSpace splits s into its body and trailing whitespace.
func trailingSpace(s string) (string, string) {
	j := len(s)
	for j > 0 && isSpace(s[j-1]) {
		j--
	}
	return s[:j], s[j:]
}

// trimmer streams a text segment with leading whitespace dropped (when
// trimLeading) and trailing whitespace held back until more text follows.
type trimmer struct {
	trimLeading bool
	started     bool   // non-whitespace seen
	pending     string // held trailing whitespace
}

func (t *trimmer) reset(trimLeading bool) {
	*t = trimmer{trimLeading: trimLeading}
}

// add returns the text to emit for s.
func (t *trimmer) add(s string) string {
	if s == "" {
		return ""
	}
	if !t.started && t.trimLeading {
		i := 0
		for i < len(s) && isSpace(s[i]) {
			i++
		}
		s = s[i:]
		if s == "" {
			return ""
		}
	}
	body, tail := trailingSpace(s)
	if body == "" {
		t.pending += tail
		return ""
	}
	t.started = true
	out := t.pending + body
	t.pending = tail
	return out
}

// takePending returns and clears the held trailing whitespace.
func (t *trimmer) takePending() string {
	p := t.pending
	t.pending = ""
	return p
}

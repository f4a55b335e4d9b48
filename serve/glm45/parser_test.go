package glm45

import (
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"
)

var weatherTools = []Tool{
	{Name: "get_weather", Parameters: json.RawMessage(`{"type":"object","properties":{"city":{"type":"string"},"days":{"type":"integer"},"units":{"type":["string","null"]}}}`)},
	{Name: "get_time"},
	{Name: "search", Parameters: json.RawMessage(`{"type":"object","properties":{"q":{"type":"string"},"filters":{"type":"object"}}}`)},
}

// sequentialIDs makes deterministic call ids so results compare exactly.
func sequentialIDs() func() string {
	n := 0
	return func() string { n++; return fmt.Sprintf("call_%d", n) }
}

func withIDs(o Options) Options {
	o.NewID = sequentialIDs()
	return o
}

var (
	optAll       = Options{Reasoning: true, ToolCalls: true, Tools: weatherTools}
	optTools     = Options{ToolCalls: true, Tools: weatherTools}
	optReasoning = Options{Reasoning: true}
)

type parseCase struct {
	name string
	opt  Options
	in   string
	want Result
}

func call(id, name, args string) ToolCall { return ToolCall{ID: id, Name: name, Arguments: args} }

var parseCases = []parseCase{
	{"plain", optAll, "Hello there.", Result{Content: "Hello there."}},
	{"no parsers keep everything", Options{}, "\n<think>r</think>\nx<tool_call>get_time</tool_call>",
		Result{Content: "\n<think>r</think>\nx<tool_call>get_time</tool_call>"}},
	{"reasoning then content", optReasoning, "\n<think>\nplan it\n</think>\nThe answer.",
		Result{Reasoning: "plan it", Content: "The answer."}},
	{"reasoning empty", optReasoning, "<think></think>\nHi", Result{Content: "Hi"}},
	{"truncated reasoning", optReasoning, "<think>still thinking about", Result{Reasoning: "still thinking about"}},
	{"truncated partial end tag", optReasoning, "<think>abc</thi", Result{Reasoning: "abc</thi"}},
	{"partial start tag only", optReasoning, "<thi", Result{Content: "<thi"}},
	{"thinking disabled", Options{Reasoning: true, ThinkingDisabled: true}, "<think>x</think>y",
		Result{Content: "<think>x</think>y"}},
	{"start in reasoning", Options{Reasoning: true, StartInReasoning: true}, "plan\n</think>\n\nanswer",
		Result{Reasoning: "plan", Content: "answer"}},
	{"no think at start is content", optReasoning, "Sure. <think>not reasoning</think>",
		Result{Content: "Sure. <think>not reasoning</think>"}},
	{"nested think is reasoning text", optReasoning, "<think>a <think> b</think>c",
		Result{Reasoning: "a <think> b", Content: "c"}},
	{"tool call", optTools,
		"I will check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
		Result{Content: "I will check.", ToolCalls: []ToolCall{call("call_1", "get_weather", `{"city": "Paris", "days": 3}`)}}},
	{"string type keeps number text", optTools,
		"<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>42</arg_value>\n</tool_call>",
		Result{ToolCalls: []ToolCall{call("call_1", "get_weather", `{"city": "42"}`)}}},
	{"non-string invalid json stays string", optTools,
		"<tool_call>get_weather\n<arg_key>days</arg_key>\n<arg_value>three</arg_value>\n</tool_call>",
		Result{ToolCalls: []ToolCall{call("call_1", "get_weather", `{"days": "three"}`)}}},
	{"union with string is string", optTools,
		"<tool_call>get_weather<arg_key>units</arg_key><arg_value>1</arg_value></tool_call>",
		Result{ToolCalls: []ToolCall{call("call_1", "get_weather", `{"units": "1"}`)}}},
	{"object value and escaping", optTools,
		"<tool_call>search\n<arg_key>q</arg_key>\n<arg_value>say \"hi\"\n<b>&</b> 中文</arg_value>\n<arg_key>filters</arg_key>\n<arg_value>{\"a\": [1, 2]}</arg_value>\n</tool_call>",
		Result{ToolCalls: []ToolCall{call("call_1", "search", `{"q": "say \"hi\"\n<b>&</b> 中文", "filters": {"a":[1,2]}}`)}}},
	{"no args no newline", optTools, "<tool_call>get_time</tool_call>",
		Result{ToolCalls: []ToolCall{call("call_1", "get_time", `{}`)}}},
	{"no args with newline", optTools, "<tool_call>get_time\n</tool_call>",
		Result{ToolCalls: []ToolCall{call("call_1", "get_time", `{}`)}}},
	{"whitespace variants", optTools, "<tool_call> get_weather <arg_key> city </arg_key>  <arg_value>  Oslo \n</arg_value></tool_call>",
		Result{ToolCalls: []ToolCall{call("call_1", "get_weather", `{"city": "Oslo"}`)}}},
	{"two calls", optTools,
		"Calling both.\n<tool_call>get_time\n</tool_call>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>\n</tool_call>",
		Result{Content: "Calling both.", ToolCalls: []ToolCall{call("call_1", "get_time", `{}`), call("call_2", "get_weather", `{"city": "Rome"}`)}}},
	{"text after call kept", optTools, "<tool_call>get_time</tool_call>\nDone.",
		Result{Content: "Done.", ToolCalls: []ToolCall{call("call_1", "get_time", `{}`)}}},
	{"reasoning and tool call", optAll,
		"\n<think>need weather</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>",
		Result{Reasoning: "need weather", ToolCalls: []ToolCall{call("call_1", "get_weather", `{"city": "Paris"}`)}}},
	{"tool markup inside reasoning is reasoning", optAll, "<think><tool_call>get_time</tool_call></think>ok",
		Result{Reasoning: "<tool_call>get_time</tool_call>", Content: "ok"}},
	{"unknown function is content", optTools, "Hi\n<tool_call>rm_rf\n<arg_key>p</arg_key>\n<arg_value>/</arg_value>\n</tool_call>\nbye",
		Result{Content: "Hi\n<tool_call>rm_rf\n<arg_key>p</arg_key>\n<arg_value>/</arg_value>\n</tool_call>\nbye"}},
	{"nameless call is content", optTools, "<tool_call></tool_call>", Result{Content: "<tool_call></tool_call>"}},
	{"any name without tool list", Options{ToolCalls: true}, "<tool_call>f\n<arg_key>n</arg_key><arg_value>1</arg_value></tool_call>",
		Result{ToolCalls: []ToolCall{call("call_1", "f", `{"n": 1}`)}}},
	{"unclosed call closes", optTools, "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Par",
		Result{ToolCalls: []ToolCall{call("call_1", "get_weather", `{"city": "Par"}`)}}},
	{"unclosed non-string value", optTools, "<tool_call>get_weather\n<arg_key>days</arg_key>\n<arg_value>[1,",
		Result{ToolCalls: []ToolCall{call("call_1", "get_weather", `{"days": "[1,"}`)}}},
	{"unclosed partial key dropped", optTools, "<tool_call>get_weather\n<arg_key>ci",
		Result{ToolCalls: []ToolCall{call("call_1", "get_weather", `{}`)}}},
	{"unclosed partial name unknown", optTools, "ok <tool_call>get_wea", Result{Content: "ok <tool_call>get_wea"}},
	{"unclosed partial start tag", optTools, "ok <tool_ca", Result{Content: "ok <tool_ca"}},
	{"next call without close", optTools, "<tool_call>get_time\n<tool_call>get_time</tool_call>",
		Result{ToolCalls: []ToolCall{call("call_1", "get_time", `{}`), call("call_2", "get_time", `{}`)}}},
	{"missing arg_value close", optTools, "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</tool_call>",
		Result{ToolCalls: []ToolCall{call("call_1", "get_weather", `{"city": "Oslo"}`)}}},
	{"missing arg_key close", optTools, "<tool_call>get_weather<arg_key>city<arg_value>Oslo</arg_value></tool_call>",
		Result{ToolCalls: []ToolCall{call("call_1", "get_weather", `{"city": "Oslo"}`)}}},
	{"json arguments", optTools, "<tool_call>get_weather\n{\"city\": \"Oslo\", \"days\": 2}\n</tool_call>",
		Result{ToolCalls: []ToolCall{call("call_1", "get_weather", `{"city":"Oslo","days":2}`)}}},
	{"json arguments glued to name", optTools, "<tool_call>get_weather{\"city\":\"Oslo\"}</tool_call>",
		Result{ToolCalls: []ToolCall{call("call_1", "get_weather", `{"city":"Oslo"}`)}}},
	{"overlong name is content", optTools, "<tool_call>" + strings.Repeat("x", 300) + " tail",
		Result{Content: "<tool_call>" + strings.Repeat("x", 300) + " tail"}},
	{"content lt signs", optTools, "a < b <tool and <3", Result{Content: "a < b <tool and <3"}},
}

func TestParse(t *testing.T) {
	for _, tc := range parseCases {
		t.Run(tc.name, func(t *testing.T) {
			got := Parse(tc.in, withIDs(tc.opt))
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("Parse(%q)\n got %#v\nwant %#v", tc.in, got, tc.want)
			}
			for _, c := range got.ToolCalls {
				if !json.Valid([]byte(c.Arguments)) {
					t.Fatalf("arguments %q are not JSON", c.Arguments)
				}
			}
		})
	}
}

// parseStreaming feeds in as the given pieces and checks that no delta leaks
// a partial or complete tag that the whole parse would not show.
func parseStreaming(opt Options, pieces []string) (Result, []Delta) {
	p := NewParser(opt)
	var acc Accumulator
	var deltas []Delta
	for _, s := range pieces {
		d := p.Feed(s)
		acc.Add(d)
		deltas = append(deltas, d)
	}
	d := p.Finish()
	acc.Add(d)
	deltas = append(deltas, d)
	return acc.Result(), deltas
}

// TestStreamingEqualsWholeAtEveryOffset splits each case at every byte
// offset (in two, and in one-byte pieces) and checks the joined deltas.
func TestStreamingEqualsWholeAtEveryOffset(t *testing.T) {
	for _, tc := range parseCases {
		t.Run(tc.name, func(t *testing.T) {
			want := Parse(tc.in, withIDs(tc.opt))
			for i := 0; i <= len(tc.in); i++ {
				got, _ := parseStreaming(withIDs(tc.opt), []string{tc.in[:i], tc.in[i:]})
				if !reflect.DeepEqual(got, want) {
					t.Fatalf("split at %d: got %#v want %#v", i, got, want)
				}
			}
			var bytesPieces []string
			for i := 0; i < len(tc.in); i++ {
				bytesPieces = append(bytesPieces, tc.in[i:i+1])
			}
			got, deltas := parseStreaming(withIDs(tc.opt), bytesPieces)
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("byte pieces: got %#v want %#v", got, want)
			}
			// A tag that the final content does not contain never appears in a
			// content delta, even partially at a piece boundary.
			for _, d := range deltas {
				if d.Content != "" && !strings.Contains(want.Content, d.Content) {
					t.Fatalf("content delta %q is not part of the final content %q", d.Content, want.Content)
				}
				if d.Reasoning != "" && !strings.Contains(want.Reasoning, d.Reasoning) {
					t.Fatalf("reasoning delta %q is not part of the final reasoning %q", d.Reasoning, want.Reasoning)
				}
			}
		})
	}
}

// TestToolArgumentsStream checks that string arguments arrive while the
// value is still being generated, not only at </tool_call>.
func TestToolArgumentsStream(t *testing.T) {
	p := NewParser(withIDs(optTools))
	d := p.Feed("<tool_call>get_weather\n")
	if len(d.ToolCalls) != 1 || d.ToolCalls[0].Name != "get_weather" || d.ToolCalls[0].ID != "call_1" {
		t.Fatalf("name delta = %#v", d)
	}
	d = p.Feed("<arg_key>city</arg_key>\n<arg_value>San")
	if len(d.ToolCalls) != 1 || d.ToolCalls[0].Arguments != `{"city": "San` {
		t.Fatalf("argument delta = %#v", d)
	}
	d = p.Feed(" Francisco</arg_value>\n</tool_call>")
	if len(d.ToolCalls) != 1 || d.ToolCalls[0].Arguments != ` Francisco"}` {
		t.Fatalf("closing delta = %#v", d)
	}
	if !p.CalledTools() {
		t.Fatal("CalledTools = false")
	}
}

// checkNoTextLost asserts the parser invariants on arbitrary input.
func checkParserInvariants(t *testing.T, in string, splits []int, opt Options) {
	t.Helper()
	want := Parse(in, withIDs(opt))
	var pieces []string
	prev := 0
	for _, s := range splits {
		if s > prev && s < len(in) {
			pieces = append(pieces, in[prev:s])
			prev = s
		}
	}
	pieces = append(pieces, in[prev:])
	got, _ := parseStreaming(withIDs(opt), pieces)
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("streaming %q in %q\n got %#v\nwant %#v", in, pieces, got, want)
	}
	for _, c := range got.ToolCalls {
		if !json.Valid([]byte(c.Arguments)) || !strings.HasPrefix(c.Arguments, "{") {
			t.Fatalf("arguments %q are not a JSON object", c.Arguments)
		}
	}
	if !strings.Contains(in, "<") {
		// Without markup nothing is parsed: all text survives (the tool parser
		// keeps it verbatim; the reasoning parser drops only leading whitespace).
		if opt.Reasoning {
			if got.Content != strings.TrimLeft(in, " \n\t\r\f\v") {
				t.Fatalf("content %q lost text of %q", got.Content, in)
			}
		} else if got.Content != in {
			t.Fatalf("content %q lost text of %q", got.Content, in)
		}
	}
	if utf8.ValidString(in) && (!utf8.ValidString(got.Content) || !utf8.ValidString(got.Reasoning)) {
		t.Fatalf("valid input gave invalid UTF-8 output %#v", got)
	}
}

func FuzzToolParser(f *testing.F) {
	for _, tc := range parseCases {
		f.Add(tc.in, uint16(len(tc.in)/2), uint16(len(tc.in)/3), true)
	}
	f.Add("<think>a</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>x</arg_value></tool_call>", uint16(5), uint16(40), false)
	f.Fuzz(func(t *testing.T, in string, s1, s2 uint16, reasoning bool) {
		splits := []int{int(s1) % (len(in) + 1), int(s2) % (len(in) + 1)}
		if splits[0] > splits[1] {
			splits[0], splits[1] = splits[1], splits[0]
		}
		checkParserInvariants(t, in, splits, Options{Reasoning: reasoning, ToolCalls: true, Tools: weatherTools})
		checkParserInvariants(t, in, splits, Options{ToolCalls: true})
	})
}

// BenchmarkParserStreaming measures the per-delta cost of the full parser on
// a reasoning + tool-call output fed in small pieces, as a detokenizer would.
func BenchmarkParserStreaming(b *testing.B) {
	out := "<think>" + strings.Repeat("Let me think about the weather. ", 50) + "</think>\nChecking.\n" +
		"<tool_call>search\n<arg_key>q</arg_key>\n<arg_value>" + strings.Repeat("weather in Paris ", 40) +
		"</arg_value>\n<arg_key>filters</arg_key>\n<arg_value>{\"days\": [1, 2, 3]}</arg_value>\n</tool_call>"
	var pieces []string
	for i := 0; i < len(out); i += 4 {
		pieces = append(pieces, out[i:min(i+4, len(out))])
	}
	b.SetBytes(int64(len(out)))
	b.ReportAllocs()
	for b.Loop() {
		p := NewParser(Options{Reasoning: true, ToolCalls: true, Tools: weatherTools, NewID: func() string { return "call_x" }})
		for _, s := range pieces {
			p.Feed(s)
		}
		p.Finish()
	}
	b.ReportMetric(float64(len(pieces)), "deltas/op")
}

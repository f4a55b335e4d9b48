package serve

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/parallel"
)

const (
	reasoningScript = "\n<think>I should greet.</think>\nHello world! How are you?"
	toolScript      = "\n<think>need weather</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
	weatherTool     = `{"type":"function","function":{"name":"get_weather","description":"Current weather","parameters":{"type":"object","properties":{"city":{"type":"string"},"days":{"type":"integer"}},"required":["city"]}}}`
)

func chatBody(extra string) string {
	b := `{"model":"glm-test","messages":[{"role":"user","content":"Hi"}]`
	if extra != "" {
		b += "," + extra
	}
	return b + "}"
}

func decodeChat(t *testing.T, body []byte) chatResponse {
	t.Helper()
	var r chatResponse
	if err := json.Unmarshal(body, &r); err != nil {
		t.Fatalf("decode %s: %v", body, err)
	}
	if len(r.Choices) != 1 {
		t.Fatalf("choices: %s", body)
	}
	return r
}

func TestChatReasoningAndContent(t *testing.T) {
	gen := newFakeGen(scriptText(t, reasoningScript))
	_, ts := newTestServer(t, testConfig(), gen)
	nTokens := len(testTokenizer(t).Encode(reasoningScript))

	status, body := post(t, ts, "/v1/chat/completions", chatBody(`"temperature":0.5,"top_p":0.9,"top_k":20,"seed":7,"min_tokens":2,"ignore_eos":true`))
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	r := decodeChat(t, body)
	msg := r.Choices[0].Message
	if msg.Content == nil || *msg.Content != "Hello world! How are you?" || msg.ReasoningContent == nil || *msg.ReasoningContent != "I should greet." {
		t.Fatalf("message %s", body)
	}
	if r.Choices[0].FinishReason != "stop" || r.Object != "chat.completion" || !strings.HasPrefix(r.ID, "chatcmpl-") {
		t.Fatalf("response %s", body)
	}
	req := gen.lastRequest()
	if r.Usage.PromptTokens != len(req.PromptIDs) || r.Usage.CompletionTokens != nTokens || r.Usage.TotalTokens != r.Usage.PromptTokens+nTokens {
		t.Fatalf("usage %+v, prompt %d, script %d", r.Usage, len(req.PromptIDs), nTokens)
	}
	want := parallel.SamplingParams{Temperature: 0.5, TopP: 0.9, TopK: 20, Seed: 7, HasSeed: true}
	if req.Sampling != want || req.MinNewTokens != 2 || !req.IgnoreEOS || req.MaxNewTokens != gen.maxLen-len(req.PromptIDs) {
		t.Fatalf("engine request %+v", req)
	}

	// Streaming gives the same message, in more than one chunk.
	status, body = post(t, ts, "/v1/chat/completions", chatBody(`"stream":true,"stream_options":{"include_usage":true}`))
	if status != 200 {
		t.Fatalf("stream status %d: %s", status, body)
	}
	s := joinChatStream(t, body)
	if s.Content != *msg.Content || s.Reasoning != *msg.ReasoningContent || s.FinishReason != "stop" || s.Chunks < 5 {
		t.Fatalf("stream %+v", s)
	}
	if s.Usage == nil || *s.Usage != *r.Usage {
		t.Fatalf("stream usage %+v, want %+v", s.Usage, r.Usage)
	}
	if strings.Contains(string(body), "<think>") || strings.Contains(string(body), "</think") {
		t.Fatalf("markup leaked into the stream: %s", body)
	}
	// Without include_usage there is no usage chunk.
	_, body = post(t, ts, "/v1/chat/completions", chatBody(`"stream":true`))
	if s := joinChatStream(t, body); s.Usage != nil {
		t.Fatalf("usage without include_usage: %s", body)
	}
}

func TestChatThinkingDisabledAndNoReasoningParser(t *testing.T) {
	gen := newFakeGen(scriptText(t, "\nPlain <think>answer"))
	_, ts := newTestServer(t, testConfig(), gen)
	_, body := post(t, ts, "/v1/chat/completions", chatBody(`"chat_template_kwargs":{"enable_thinking":false}`))
	r := decodeChat(t, body)
	if got := *r.Choices[0].Message.Content; got != "Plain <think>answer" || r.Choices[0].Message.ReasoningContent != nil {
		t.Fatalf("message %s", body)
	}
	status, body := post(t, ts, "/v1/chat/completions", chatBody(`"chat_template_kwargs":{"enable_thinking":"no"}`))
	if status != 400 {
		t.Fatalf("non-bool enable_thinking: %d %s", status, body)
	}

	cfg := testConfig()
	cfg.ReasoningParser = ""
	_, ts = newTestServer(t, cfg, newFakeGen(scriptText(t, reasoningScript)))
	_, body = post(t, ts, "/v1/chat/completions", chatBody(""))
	if got := *decodeChat(t, body).Choices[0].Message.Content; got != reasoningScript {
		t.Fatalf("without reasoning parser content = %q", got)
	}
}

func TestChatToolCall(t *testing.T) {
	gen := newFakeGen(scriptText(t, toolScript))
	_, ts := newTestServer(t, testConfig(), gen)
	status, body := post(t, ts, "/v1/chat/completions", chatBody(`"tools":[`+weatherTool+`]`))
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	r := decodeChat(t, body)
	msg := r.Choices[0].Message
	if r.Choices[0].FinishReason != "tool_calls" || len(msg.ToolCalls) != 1 || msg.Content != nil {
		t.Fatalf("response %s", body)
	}
	tc := msg.ToolCalls[0]
	if tc.Type != "function" || tc.Function.Name != "get_weather" || tc.Function.Arguments != `{"city": "Paris", "days": 3}` || !strings.HasPrefix(tc.ID, "call_") {
		t.Fatalf("tool call %+v", tc)
	}
	if !strings.Contains(testTokenizer(t).Decode(gen.lastRequest().PromptIDs), `"name": "get_weather"`) {
		t.Fatal("tools are not in the prompt")
	}

	_, body = post(t, ts, "/v1/chat/completions", chatBody(`"stream":true,"tools":[`+weatherTool+`]`))
	s := joinChatStream(t, body)
	if s.FinishReason != "tool_calls" || len(s.ToolCalls) != 1 || s.ToolCalls[0].Function != tc.Function || s.Content != "" || s.Reasoning != "need weather" {
		t.Fatalf("stream %+v", s)
	}
	if strings.Contains(string(body), "arg_") || strings.Contains(string(body), "tool_call>") {
		t.Fatalf("markup leaked: %s", body)
	}
}

func TestChatToolChoice(t *testing.T) {
	tok := testTokenizer(t)
	cases := []struct {
		name, choice string
		cfg          func(*Config)
		script       string
		status       int
		wantPrefill  string // the prompt must end with this
		wantCall     string // name of the expected call ("" none)
		wantContent  string
	}{
		{name: "required", choice: `"required"`, script: "get_weather\n<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call>",
			status: 200, wantPrefill: "<|assistant|>\n<think></think>\n<tool_call>", wantCall: "get_weather"},
		{name: "named", choice: `{"type":"function","function":{"name":"get_weather"}}`, script: "<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call>",
			status: 200, wantPrefill: "<think></think>\n<tool_call>get_weather\n", wantCall: "get_weather"},
		{name: "none", choice: `"none"`, script: "<tool_call>get_weather</tool_call>", status: 200, wantContent: "<tool_call>get_weather</tool_call>"},
		{name: "auto disabled", choice: `"auto"`, cfg: func(c *Config) { c.EnableAutoToolChoice = false }, status: 400},
		{name: "no parser", choice: `"required"`, cfg: func(c *Config) { c.EnableAutoToolChoice, c.ToolCallParser = false, "" }, status: 400},
		{name: "unknown named", choice: `{"type":"function","function":{"name":"nope"}}`, status: 400},
		{name: "bad choice", choice: `"sometimes"`, status: 400},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig()
			if tc.cfg != nil {
				tc.cfg(&cfg)
			}
			gen := newFakeGen(scriptText(t, tc.script))
			_, ts := newTestServer(t, cfg, gen)
			for _, stream := range []bool{false, true} {
				status, body := post(t, ts, "/v1/chat/completions", chatBody(fmt.Sprintf(`"stream":%v,"tool_choice":%s,"tools":[%s]`, stream, tc.choice, weatherTool)))
				if status != tc.status {
					t.Fatalf("status %d want %d: %s", status, tc.status, body)
				}
				if status != 200 {
					var e errorBody
					if json.Unmarshal(body, &e) != nil || e.Error.Code != status || e.Error.Message == "" {
						t.Fatalf("error body %s", body)
					}
					return
				}
				prompt := tok.Decode(gen.lastRequest().PromptIDs)
				if !strings.HasSuffix(prompt, tc.wantPrefill) {
					t.Fatalf("prompt %q does not end with %q", prompt, tc.wantPrefill)
				}
				if tc.name == "none" && strings.Contains(prompt, "get_weather") {
					t.Fatalf("tool_choice none put tools in the prompt: %q", prompt)
				}
				var got streamedChat
				if stream {
					got = joinChatStream(t, body)
				} else {
					m := decodeChat(t, body)
					got.ToolCalls, got.FinishReason = m.Choices[0].Message.ToolCalls, m.Choices[0].FinishReason
					if m.Choices[0].Message.Content != nil {
						got.Content = *m.Choices[0].Message.Content
					}
				}
				if tc.wantCall != "" {
					if len(got.ToolCalls) != 1 || got.ToolCalls[0].Function.Name != tc.wantCall ||
						got.ToolCalls[0].Function.Arguments != `{"city": "Oslo"}` || got.FinishReason != "tool_calls" {
						t.Fatalf("stream=%v: %+v", stream, got)
					}
				} else if len(got.ToolCalls) != 0 || got.Content != tc.wantContent {
					t.Fatalf("stream=%v: %+v", stream, got)
				}
			}
		})
	}
}

func TestStopStringsAndLength(t *testing.T) {
	gen := newFakeGen(scriptText(t, "Hello world, and more words after it."))
	_, ts := newTestServer(t, testConfig(), gen)
	cases := []struct {
		name, extra, want, finish string
	}{
		{"stop string", `"stop":"world"`, "Hello ", "stop"},
		{"stop list earliest", `"stop":["after","and"]`, "Hello world, ", "stop"},
		{"stop inside a token", `"stop":"ll"`, "He", "stop"},
		{"stop not present", `"stop":["zebra"]`, "Hello world, and more words after it.", "stop"},
		{"length", `"max_tokens":2`, "", "length"},
		{"max_completion_tokens wins", `"max_tokens":100,"max_completion_tokens":2`, "", "length"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, body := post(t, ts, "/v1/chat/completions", chatBody(tc.extra))
			r := decodeChat(t, body)
			got := *r.Choices[0].Message.Content
			if tc.finish == "length" {
				if r.Usage.CompletionTokens != 2 || gen.lastRequest().MaxNewTokens != 2 {
					t.Fatalf("usage %+v max %d", r.Usage, gen.lastRequest().MaxNewTokens)
				}
				tc.want = testTokenizer(t).Decode(testTokenizer(t).Encode("Hello world")[:2])
			}
			if got != tc.want || r.Choices[0].FinishReason != tc.finish {
				t.Fatalf("got %q/%s want %q/%s", got, r.Choices[0].FinishReason, tc.want, tc.finish)
			}
			_, body = post(t, ts, "/v1/chat/completions", chatBody(`"stream":true,`+tc.extra))
			s := joinChatStream(t, body)
			if s.Content != tc.want || s.FinishReason != tc.finish {
				t.Fatalf("stream got %q/%s want %q/%s", s.Content, s.FinishReason, tc.want, tc.finish)
			}
			// Completions cut the same way.
			_, body = post(t, ts, "/v1/completions", `{"model":"glm-test","prompt":"x","max_tokens":50,`+strings.Replace(tc.extra, `"max_tokens":100,`, "", 1)+`}`)
			var cr completionResponse
			if err := json.Unmarshal(body, &cr); err != nil || len(cr.Choices) != 1 {
				t.Fatalf("completion %s", body)
			}
			if tc.finish != "length" && (cr.Choices[0].Text != tc.want || *cr.Choices[0].FinishReason != tc.finish) {
				t.Fatalf("completion %q/%s", cr.Choices[0].Text, *cr.Choices[0].FinishReason)
			}
		})
	}
}

func TestCompletions(t *testing.T) {
	gen := newFakeGen(scriptText(t, "<think>x</think> done<|endoftext|>"))
	_, ts := newTestServer(t, testConfig(), gen)
	tok := testTokenizer(t)
	status, body := post(t, ts, "/v1/completions", `{"model":"glm-test","prompt":"Once upon","max_tokens":50}`)
	if status != 200 {
		t.Fatalf("status %d %s", status, body)
	}
	var cr completionResponse
	if err := json.Unmarshal(body, &cr); err != nil {
		t.Fatal(err)
	}
	if cr.Object != "text_completion" || cr.Choices[0].Text != "x done" || *cr.Choices[0].FinishReason != "stop" ||
		cr.Usage.PromptTokens != len(tok.Encode("Once upon")) {
		t.Fatalf("completion %s", body)
	}
	if !slices.Equal(gen.lastRequest().PromptIDs, tok.Encode("Once upon")) {
		t.Fatal("prompt ids differ")
	}
	// Token-id prompt, special tokens kept, streaming.
	status, body = post(t, ts, "/v1/completions", `{"model":"glm-test","prompt":[5,6,7],"max_tokens":50,"skip_special_tokens":false,"stream":true,"stream_options":{"include_usage":true}}`)
	if status != 200 {
		t.Fatalf("status %d %s", status, body)
	}
	events := sseEvents(t, body)
	var text, finish string
	var usage *Usage
	for _, ev := range events[:len(events)-1] {
		var c completionResponse
		if err := json.Unmarshal([]byte(ev), &c); err != nil {
			t.Fatal(err)
		}
		if c.Usage != nil {
			usage = c.Usage
		}
		for _, ch := range c.Choices {
			text += ch.Text
			if ch.FinishReason != nil {
				finish = *ch.FinishReason
			}
		}
	}
	if text != "<think>x</think> done" || finish != "stop" || usage == nil || usage.PromptTokens != 3 || events[len(events)-1] != "[DONE]" {
		t.Fatalf("stream text %q finish %q usage %+v", text, finish, usage)
	}
	if !slices.Equal(gen.lastRequest().PromptIDs, []int{5, 6, 7}) {
		t.Fatal("token prompt not passed through")
	}
}

func TestMetrics(t *testing.T) {
	gen := newFakeGen(scriptText(t, "Hello world"))
	s, ts := newTestServer(t, testConfig(), gen)
	post(t, ts, "/v1/chat/completions", chatBody(""))
	post(t, ts, "/v1/chat/completions", chatBody(`"max_tokens":1`))
	post(t, ts, "/v1/chat/completions", `{"model":"x"}`)
	m := scrapeMetrics(t, s)
	for _, want := range []string{
		`glmtopo:request_success_total{finished_reason="stop",model_name="glm-test"} 1`,
		`glmtopo:request_success_total{finished_reason="length",model_name="glm-test"} 1`,
		`glmtopo:request_errors_total{code="400",model_name="glm-test"} 1`,
		`glmtopo:generation_tokens_total{model_name="glm-test"} ` + fmt.Sprint(len(testTokenizer(t).Encode("Hello world"))+1),
		`glmtopo:time_to_first_token_seconds_count{model_name="glm-test"} 2`,
		`glmtopo:e2e_request_latency_seconds_count{model_name="glm-test"} 2`,
		`glmtopo:num_requests_running{model_name="glm-test"} 0`,
		`glmtopo:num_requests_waiting{model_name="glm-test"} 0`,
		`glmtopo:inter_token_latency_seconds_bucket`,
		`glmtopo:prompt_tokens_total`,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

func TestModelsTokenizeDetokenize(t *testing.T) {
	tok := testTokenizer(t)
	cfg := testConfig()
	cfg.ServedModelNames = []string{"glm-test", "alias"}
	cfg.MaxModelLen = 128
	_, ts := newTestServer(t, cfg, newFakeGen(scriptText(t, "ok")))
	resp, err := ts.Client().Get(ts.URL + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var models struct {
		Object string      `json:"object"`
		Data   []modelCard `json:"data"`
	}
	if err := json.Unmarshal(b, &models); err != nil || len(models.Data) != 2 || models.Data[1].ID != "alias" || models.Data[0].MaxModelLen != 128 {
		t.Fatalf("models %s", b)
	}

	status, b := post(t, ts, "/tokenize", `{"model":"alias","prompt":"Hello <think>"}`)
	var tr tokenizeResponse
	if status != 200 || json.Unmarshal(b, &tr) != nil || !slices.Equal(tr.Tokens, tok.Encode("Hello <think>")) || tr.Count != len(tr.Tokens) || tr.MaxModelLen != 128 {
		t.Fatalf("tokenize %d %s", status, b)
	}
	status, b = post(t, ts, "/tokenize", `{"messages":[{"role":"user","content":"Hi"}],"add_generation_prompt":false,"tools":[`+weatherTool+`]}`)
	if status != 200 || json.Unmarshal(b, &tr) != nil || tr.Count == 0 || !strings.Contains(tok.Decode(tr.Tokens), "get_weather") ||
		strings.HasSuffix(tok.Decode(tr.Tokens), "<|assistant|>") {
		t.Fatalf("chat tokenize %d %s", status, b)
	}
	ids, _ := json.Marshal(tok.Encode("round trip ✓"))
	status, b = post(t, ts, "/detokenize", `{"tokens":`+string(ids)+`}`)
	var dr struct{ Prompt string }
	if status != 200 || json.Unmarshal(b, &dr) != nil || dr.Prompt != "round trip ✓" {
		t.Fatalf("detokenize %d %s", status, b)
	}
}

func TestConfig(t *testing.T) {
	gen := newFakeGen(scriptText(t, "ok"))
	bad := []func(*Config){
		func(c *Config) { c.ToolCallParser = "hermes" },
		func(c *Config) { c.ReasoningParser = "qwen3" },
		func(c *Config) { c.ToolCallParser = "" }, // auto tool choice without a parser
		func(c *Config) { c.MaxModelLen = 5000 },  // beyond the engine's 1024
		func(c *Config) { c.ServedModelNames = nil },
		func(c *Config) { c.MaxNumSeqs = 0 },
		func(c *Config) { c.Port = 70000 },
	}
	for i, mod := range bad {
		cfg := testConfig()
		mod(&cfg)
		if _, err := NewServer(cfg, gen, testTokenizer(t), nil); err == nil {
			t.Errorf("bad config %d accepted", i)
		}
	}
}

func TestChatRequestDecodeAccepts(t *testing.T) {
	body := `{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"a"}]},
	{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"f","arguments":"{}"}}]},
	{"role":"tool","tool_call_id":"call_1","content":"r"}],"stop":"x","tool_choice":{"type":"function","function":{"name":"f"}},
	"tools":[{"type":"function","function":{"name":"f","parameters":{}}}],"unknown_field":1,"logprobs":false,
	"presence_penalty":0,"response_format":{"type":"text"}}`
	r, e := DecodeChatRequest([]byte(body))
	if e != nil {
		t.Fatalf("decode: %v", e)
	}
	if len(r.Messages) != 4 || r.Messages[1].Content != "a" || len(r.Messages[2].ToolCalls) != 1 || r.ToolChoice.Function != "f" || !slices.Equal(r.Stop, []string{"x"}) {
		t.Fatalf("decoded %+v", r)
	}
}

func FuzzDecodeChatRequest(f *testing.F) {
	f.Add([]byte(chatBody(`"tools":[` + weatherTool + `],"tool_choice":"required","stop":["a"]`)))
	f.Add([]byte(`{"messages":[{"role":"user","content":[{"type":"text","text":"x"}]}],"max_tokens":-1}`))
	f.Add([]byte(`{"messages":null}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, body []byte) {
		r, e := DecodeChatRequest(body)
		if (r == nil) == (e == nil) {
			t.Fatalf("request %v and error %v", r, e)
		}
		if e != nil {
			if e.Status != http.StatusBadRequest || e.Message == "" || e.Type == "" {
				t.Fatalf("error %+v", e)
			}
			var eb errorBody
			b, _ := json.Marshal(e.body())
			if json.Unmarshal(b, &eb) != nil || eb.Error.Code != 400 {
				t.Fatalf("error body %s", b)
			}
			return
		}
		if len(r.Messages) == 0 {
			t.Fatal("accepted a request without messages")
		}
	})
}

func TestConcurrentStreams(t *testing.T) {
	gen := newFakeGen(scriptText(t, "<think>a</think>\nSome streamed answer text for load."))
	gen.delay = time.Millisecond
	if got := runConcurrentStreams(t, gen, 200); got != 200 {
		t.Fatalf("%d of 200 completed", got)
	}
}

func TestListenAndServeShutsDown(t *testing.T) {
	cfg := testConfig()
	cfg.Host, cfg.Port = "127.0.0.1", 0
	s, err := NewServer(cfg, newFakeGen(scriptText(t, "ok")), testTokenizer(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.ListenAndServe(ctx) }()
	time.Sleep(50 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		if err != nil && !errors.Is(err, context.Canceled) {
			t.Fatalf("ListenAndServe: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ListenAndServe did not return after cancel")
	}
}

func TestRegisterFlags(t *testing.T) {
	cfg := DefaultConfig()
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	cfg.RegisterFlags(fs)
	err := fs.Parse([]string{"--host", "127.0.0.1", "--port", "9000", "--api-key", "k", "--served-model-name", "a",
		"--served-model-name", "b", "--max-model-len", "4096", "--enable-auto-tool-choice", "--tool-call-parser", "glm45",
		"--reasoning-parser", "glm45", "--max-num-seqs", "8", "--max-waiting-requests", "2"})
	if err != nil {
		t.Fatal(err)
	}
	want := Config{Host: "127.0.0.1", Port: 9000, APIKey: "k", ServedModelNames: []string{"a", "b"}, MaxModelLen: 4096,
		EnableAutoToolChoice: true, ToolCallParser: "glm45", ReasoningParser: "glm45", MaxNumSeqs: 8, MaxWaiting: 2,
		ShutdownTimeout: DefaultConfig().ShutdownTimeout}
	if !reflect.DeepEqual(cfg, want) {
		t.Fatalf("parsed %+v\nwant %+v", cfg, want)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
}

// BenchmarkChatStreamTokens measures the API layer's cost per streamed token
// (detokenize, stop strings, parsers, SSE over loopback HTTP) with an engine
// that costs nothing.
func BenchmarkChatStreamTokens(b *testing.B) {
	tok := testTokenizer(b)
	ids := tok.Encode("<think>" + strings.Repeat("some reasoning text ", 100) + "</think>\n" + strings.Repeat("and the answer ", 100))
	gen := newFakeGen(func(parallel.Request) []int { return ids })
	_, ts := newTestServer(b, testConfig(), gen)
	body := chatBody(`"stream":true,"stop":["never-matches"]`)
	b.ResetTimer()
	for b.Loop() {
		status, out := post(b, ts, "/v1/chat/completions", body)
		if status != 200 || !strings.HasSuffix(string(out), "data: [DONE]\n\n") {
			b.Fatalf("status %d", status)
		}
	}
	b.ReportMetric(float64(len(ids)*b.N)/b.Elapsed().Seconds(), "tokens/s")
}

// limitedGen refuses work beyond `slots` concurrent sequences, as an engine
// with a full waiting queue does.
type limitedGen struct {
	parallel.Generator
	slots chan struct{}
}

func (g *limitedGen) Generate(ctx context.Context, req parallel.Request, emit func(int) error) (parallel.Result, error) {
	select {
	case g.slots <- struct{}{}:
		defer func() { <-g.slots }()
		return g.Generator.Generate(ctx, req, emit)
	default:
		return parallel.Result{}, parallel.ErrSaturated
	}
}

func TestConcurrentStreamsSaturatedEngine(t *testing.T) {
	inner := newFakeGen(scriptText(t, "A streamed answer that takes a while to finish."))
	inner.delay = 2 * time.Millisecond
	gen := &limitedGen{Generator: inner, slots: make(chan struct{}, 20)}
	got := runConcurrentStreams(t, gen, 200)
	if got < 1 || got > 200 {
		t.Fatalf("%d of 200 completed", got)
	}
	t.Logf("%d of 200 completed, the rest got 503", got)
}

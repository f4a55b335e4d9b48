package serving

import (
	"bufio"
	"strings"
	"testing"
	"time"
)

func TestParseChunk(t *testing.T) {
	for _, tc := range []struct {
		name, in               string
		token, finished, usage bool
		text                   string
		prompt, completion     int
		err, isErr             bool
	}{
		{name: "completion token", in: `{"id":"x","choices":[{"index":0,"text":" hi","logprobs":null,"finish_reason":null}],"usage":null}`,
			token: true, text: " hi"},
		{name: "completion empty text is a token (special token)", in: `{"choices":[{"text":"","finish_reason":null}]}`, token: true},
		{name: "completion finish marker only", in: `{"choices":[{"text":"","finish_reason":"length"}]}`, finished: true},
		{name: "completion last token with finish", in: `{"choices":[{"text":"x","finish_reason":"stop"}]}`, token: true, finished: true, text: "x"},
		{name: "usage chunk", in: `{"id":"x","choices":[],"usage":{"prompt_tokens":8000,"total_tokens":9000,"completion_tokens":1000}}`,
			usage: true, prompt: 8000, completion: 1000},
		{name: "usage as float", in: `{"choices":[],"usage":{"prompt_tokens":12.0,"completion_tokens":3e0}}`, usage: true, prompt: 12, completion: 3},
		{name: "chat role announcement", in: `{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}`},
		{name: "chat role with content", in: `{"choices":[{"delta":{"role":"assistant","content":"Hi"}}]}`, token: true, text: "Hi"},
		{name: "chat content", in: `{"choices":[{"index":0,"delta":{"content":"a\"b\\n"},"logprobs":null,"finish_reason":null}]}`,
			token: true, text: `a\"b\\n`},
		{name: "chat reasoning", in: `{"choices":[{"delta":{"reasoning_content":"think"}}]}`, token: true},
		{name: "chat tool call", in: `{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\":1}"}}]}}]}`, token: true},
		{name: "chat null tool calls", in: `{"choices":[{"delta":{"content":null,"tool_calls":null},"finish_reason":"stop"}]}`, finished: true},
		{name: "continuous usage with token", in: `{"choices":[{"text":"a"}],"usage":{"prompt_tokens":5,"completion_tokens":1}}`,
			token: true, text: "a", usage: true, prompt: 5, completion: 1},
		{name: "nested unknown fields", in: `{"x":[1,{"y":[true,false,null,-1.5e3]}],"choices":[{"text":"ok","logprobs":{"tokens":["a"],"top":[{"a":-0.1}]}}]}`,
			token: true, text: "ok"},
		{name: "error", in: `{"error":{"message":"boom","code":500}}`, isErr: true},
		{name: "null error", in: `{"error":null,"choices":[{"text":"a"}]}`, token: true, text: "a"},
		{name: "truncated", in: `{"choices":[{"text":"a`, err: true},
		{name: "not json", in: `hello`, err: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var c chunk
			err := parseChunk([]byte(tc.in), &c)
			if (err != nil) != tc.err {
				t.Fatalf("err = %v, want error %v", err, tc.err)
			}
			if tc.err {
				return
			}
			if c.token != tc.token || c.finished != tc.finished || c.hasUsage != tc.usage ||
				string(c.text) != tc.text || c.promptTokens != tc.prompt || c.completionTokens != tc.completion ||
				(c.errMsg != nil) != tc.isErr {
				t.Errorf("got %+v (text %q)", c, c.text)
			}
		})
	}
}

func TestUnescape(t *testing.T) {
	s, err := unescapeJSONString([]byte(`a\"b\n\u00e9`))
	if err != nil || s != "a\"b\né" {
		t.Errorf("got %q, %v", s, err)
	}
}

func TestSSEPayload(t *testing.T) {
	for in, want := range map[string]string{"data: {}\n": "{}", "data:{}\r\n": "{}", "data: [DONE]\n": "[DONE]"} {
		if got, ok := ssePayload([]byte(in)); !ok || string(got) != want {
			t.Errorf("%q -> %q %v", in, got, ok)
		}
	}
	for _, in := range []string{": ping\n", "event: x\n", "\n"} {
		if _, ok := ssePayload([]byte(in)); ok {
			t.Errorf("%q is not data", in)
		}
	}
}

// TestStreamHotPathDoesNotAllocate reads a 200-token stream and checks the per-token path:
// allocations per stream must not grow with the number of tokens.
func TestStreamHotPathDoesNotAllocate(t *testing.T) {
	stream := sseStream(200)
	cl := &client{cfg: &Config{}}
	br := bufio.NewReaderSize(nil, 16<<10)
	out := Outcome{ITL: make([]time.Duration, 0, 256)}
	allocs := testing.AllocsPerRun(20, func() {
		br.Reset(strings.NewReader(stream))
		out.ITL, out.Chunks, out.Err = out.ITL[:0], 0, ""
		cl.stream(br, &out, 200)
	})
	if out.Chunks != 200 || out.OutputTokens != 200 || !out.Success {
		t.Fatalf("chunks %d tokens %d success %v err %q", out.Chunks, out.OutputTokens, out.Success, out.Err)
	}
	if allocs > 2 {
		t.Errorf("%.0f allocations for a 200-token stream; the per-token path must not allocate", allocs)
	}
}

// sseStream is a completions stream of n tokens followed by usage and [DONE].
func sseStream(n int) string {
	var b strings.Builder
	for i := range n {
		b.WriteString(`data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"glm","choices":[{"index":0,"text":" tok","logprobs":null,"finish_reason":null}],"usage":null}` + "\n\n")
		_ = i
	}
	b.WriteString(`data: {"id":"cmpl-1","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":` + itoa(n) + `,"total_tokens":0}}` + "\n\n")
	b.WriteString("data: [DONE]\n\n")
	return b.String()
}

func itoa(n int) string {
	if n == 0 {
		return "0"
	}
	var d []byte
	for ; n > 0; n /= 10 {
		d = append([]byte{byte('0' + n%10)}, d...)
	}
	return string(d)
}

func TestStreamWithoutTokens(t *testing.T) {
	for _, tc := range []struct{ body, want string }{
		{"data: [DONE]\n\n", "stream ended without a token chunk"},
		{`{"error":{"message":"model not found"}}` + "\n", "model not found"},
		{"data: {\"choices\":[{\"text\":\"a\"\n", "malformed JSON"},
		{"data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"error\":{\"message\":\"oom\"}}\n\n", "server error in stream"},
	} {
		cl := &client{cfg: &Config{}}
		out := Outcome{Start: time.Now()}
		cl.stream(bufio.NewReader(strings.NewReader(tc.body)), &out, 4)
		if out.Success || !strings.Contains(out.Err, tc.want) {
			t.Errorf("%q: success %v err %q, want %q", tc.body, out.Success, out.Err, tc.want)
		}
	}
}

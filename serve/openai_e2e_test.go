package serve

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/openai/openai-go/v3/shared"

	"github.com/glmtopo/glmtopo/parallel"
)

// TestOpenAIClientEndToEnd drives the server with the official OpenAI Go
// client: chat, streaming chat, completions, a tool-call round trip, usage
// and finish reasons, and an error surfaced as the client's APIError.
func TestOpenAIClientEndToEnd(t *testing.T) {
	tok := testTokenizer(t)
	const answer = "It is 21 degrees in Paris."
	var sawToolResult atomic.Bool
	gen := newFakeGen(func(req parallel.Request) []int {
		prompt := tok.Decode(req.PromptIDs)
		switch {
		case strings.Contains(prompt, "<tool_response>"):
			// The second turn must carry the call and its result back.
			sawToolResult.Store(strings.Contains(prompt, "<tool_call>get_weather") &&
				strings.Contains(prompt, "<arg_value>Paris</arg_value>") && strings.Contains(prompt, `{"temp": 21}`))
			return tok.Encode("<think>I have the result.</think>\n" + answer)
		case strings.Contains(prompt, "# Tools"):
			return tok.Encode(toolScript)
		case strings.HasSuffix(prompt, "Once upon"):
			return tok.Encode(" a time there was a model.")
		default:
			return tok.Encode(reasoningScript)
		}
	})
	cfg := testConfig()
	cfg.APIKey = "test-key"
	_, ts := newTestServer(t, cfg, gen)
	client := openai.NewClient(option.WithBaseURL(ts.URL+"/v1"), option.WithAPIKey("test-key"), option.WithMaxRetries(0))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// Plain chat: content, reasoning_content, usage, finish reason.
	resp, err := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model:    "glm-test",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Hello")},
	})
	if err != nil {
		t.Fatalf("chat: %v", err)
	}
	msg := resp.Choices[0].Message
	if msg.Content != "Hello world! How are you?" || resp.Choices[0].FinishReason != "stop" {
		t.Fatalf("chat response %+v", resp)
	}
	if rc := msg.JSON.ExtraFields["reasoning_content"].Raw(); rc != `"I should greet."` {
		t.Fatalf("reasoning_content %s", rc)
	}
	if resp.Usage.CompletionTokens != int64(len(tok.Encode(reasoningScript))) || resp.Usage.TotalTokens != resp.Usage.PromptTokens+resp.Usage.CompletionTokens {
		t.Fatalf("usage %+v", resp.Usage)
	}

	// Streaming chat through the client's accumulator.
	stream := client.Chat.Completions.NewStreaming(ctx, openai.ChatCompletionNewParams{
		Model:         "glm-test",
		Messages:      []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Hello")},
		StreamOptions: openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)},
	})
	var acc openai.ChatCompletionAccumulator
	chunks := 0
	for stream.Next() {
		if !acc.AddChunk(stream.Current()) {
			t.Fatalf("accumulator rejected chunk %s", stream.Current().RawJSON())
		}
		chunks++
	}
	if err := stream.Err(); err != nil {
		t.Fatalf("stream: %v", err)
	}
	if acc.Choices[0].Message.Content != msg.Content || acc.Choices[0].FinishReason != "stop" || chunks < 5 {
		t.Fatalf("streamed %+v in %d chunks", acc.Choices[0], chunks)
	}
	if acc.Usage.CompletionTokens != resp.Usage.CompletionTokens || acc.Usage.PromptTokens != resp.Usage.PromptTokens {
		t.Fatalf("streamed usage %+v want %+v", acc.Usage, resp.Usage)
	}

	// Tool call round trip, streaming the first turn.
	tools := []openai.ChatCompletionToolUnionParam{openai.ChatCompletionFunctionTool(shared.FunctionDefinitionParam{
		Name:        "get_weather",
		Description: openai.String("Current weather"),
		Parameters: shared.FunctionParameters{
			"type":       "object",
			"properties": map[string]any{"city": map[string]any{"type": "string"}, "days": map[string]any{"type": "integer"}},
			"required":   []string{"city"},
		},
	})}
	params := openai.ChatCompletionNewParams{
		Model:    "glm-test",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Weather in Paris?")},
		Tools:    tools,
	}
	stream = client.Chat.Completions.NewStreaming(ctx, params)
	acc = openai.ChatCompletionAccumulator{}
	var finished []openai.FinishedChatCompletionToolCall
	for stream.Next() {
		acc.AddChunk(stream.Current())
		if tc, ok := acc.JustFinishedToolCall(); ok {
			finished = append(finished, tc)
		}
	}
	if err := stream.Err(); err != nil {
		t.Fatalf("tool stream: %v", err)
	}
	first := acc.Choices[0]
	if first.FinishReason != "tool_calls" || len(first.Message.ToolCalls) != 1 {
		t.Fatalf("first turn %+v", first)
	}
	call := first.Message.ToolCalls[0]
	if call.Function.Name != "get_weather" || call.Function.Arguments != `{"city": "Paris", "days": 3}` || !strings.HasPrefix(call.ID, "call_") {
		t.Fatalf("tool call %+v", call)
	}
	if len(finished) != 1 || finished[0].Name != "get_weather" {
		t.Fatalf("JustFinishedToolCall saw %+v", finished)
	}
	params.Messages = append(params.Messages, first.Message.ToParam(), openai.ToolMessage(`{"temp": 21}`, call.ID))
	second, err := client.Chat.Completions.New(ctx, params)
	if err != nil {
		t.Fatalf("second turn: %v", err)
	}
	if !sawToolResult.Load() {
		t.Fatal("the second prompt did not carry the tool call and its result")
	}
	if second.Choices[0].Message.Content != answer || second.Choices[0].FinishReason != "stop" || len(second.Choices[0].Message.ToolCalls) != 0 {
		t.Fatalf("second turn %+v", second.Choices[0])
	}

	// Completions, plain and streaming, with a length finish.
	comp, err := client.Completions.New(ctx, openai.CompletionNewParams{
		Model:     "glm-test",
		Prompt:    openai.CompletionNewParamsPromptUnion{OfString: openai.String("Once upon")},
		MaxTokens: openai.Int(100),
	})
	if err != nil {
		t.Fatalf("completion: %v", err)
	}
	if comp.Choices[0].Text != " a time there was a model." || comp.Choices[0].FinishReason != "stop" || comp.Usage.PromptTokens != int64(len(tok.Encode("Once upon"))) {
		t.Fatalf("completion %+v", comp)
	}
	cs := client.Completions.NewStreaming(ctx, openai.CompletionNewParams{
		Model:     "glm-test",
		Prompt:    openai.CompletionNewParamsPromptUnion{OfString: openai.String("Once upon")},
		MaxTokens: openai.Int(3),
	})
	var text strings.Builder
	var reason string
	for cs.Next() {
		for _, ch := range cs.Current().Choices {
			text.WriteString(ch.Text)
			if ch.FinishReason != "" {
				reason = string(ch.FinishReason)
			}
		}
	}
	if err := cs.Err(); err != nil {
		t.Fatalf("completion stream: %v", err)
	}
	if want := tok.Decode(tok.Encode(" a time there was a model.")[:3]); text.String() != want || reason != "length" {
		t.Fatalf("completion stream %q/%s want %q/length", text.String(), reason, want)
	}

	// Errors reach the client as *openai.Error with the status.
	_, err = client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model:    "no-such-model",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("x")},
	})
	var apiErr *openai.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusNotFound {
		t.Fatalf("unknown model error %v", err)
	}
	bad := openai.NewClient(option.WithBaseURL(ts.URL+"/v1"), option.WithAPIKey("wrong"), option.WithMaxRetries(0))
	_, err = bad.Models.List(ctx)
	if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusUnauthorized {
		t.Fatalf("wrong key error %v", err)
	}
	models, err := client.Models.List(ctx)
	if err != nil || len(models.Data) != 1 || models.Data[0].ID != "glm-test" {
		t.Fatalf("models %+v %v", models, err)
	}
}

package serve

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"

	"github.com/glmtopo/glmtopo/serve/chat"
)

// APIError is an OpenAI-shaped error with its HTTP status.
type APIError struct {
	Status  int
	Message string
	Type    string
	Param   string
}

func (e *APIError) Error() string { return e.Message }

func badRequest(param, format string, args ...any) *APIError {
	return &APIError{Status: http.StatusBadRequest, Type: "BadRequestError", Param: param, Message: fmt.Sprintf(format, args...)}
}

type errorBody struct {
	Error errorDetail `json:"error"`
}

type errorDetail struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    int     `json:"code"`
}

func (e *APIError) body() errorBody {
	d := errorDetail{Message: e.Message, Type: e.Type, Code: e.Status}
	if e.Param != "" {
		p := e.Param
		d.Param = &p
	}
	return errorBody{Error: d}
}

// StopList is OpenAI's stop: a string or a list of strings.
type StopList []string

func (s *StopList) UnmarshalJSON(b []byte) error {
	if bytes.Equal(bytes.TrimSpace(b), []byte("null")) {
		*s = nil
		return nil
	}
	var one string
	if err := json.Unmarshal(b, &one); err == nil {
		*s = StopList{one}
		return nil
	}
	var many []string
	if err := json.Unmarshal(b, &many); err != nil {
		return errors.New("stop must be a string or a list of strings")
	}
	*s = many
	return nil
}

// ToolChoice is "none", "auto", "required" or a named function.
type ToolChoice struct {
	Mode     string // none, auto, required, function ("" when absent)
	Function string // the name when Mode is function
}

func (t *ToolChoice) UnmarshalJSON(b []byte) error {
	if bytes.Equal(bytes.TrimSpace(b), []byte("null")) {
		*t = ToolChoice{}
		return nil
	}
	var mode string
	if err := json.Unmarshal(b, &mode); err == nil {
		switch mode {
		case "none", "auto", "required":
			*t = ToolChoice{Mode: mode}
			return nil
		}
		return fmt.Errorf("tool_choice %q is not none, auto, required or a function", mode)
	}
	var named struct {
		Type     string `json:"type"`
		Function struct {
			Name string `json:"name"`
		} `json:"function"`
	}
	if err := json.Unmarshal(b, &named); err != nil || named.Function.Name == "" {
		return errors.New(`tool_choice must be "none", "auto", "required" or {"type":"function","function":{"name":...}}`)
	}
	*t = ToolChoice{Mode: "function", Function: named.Function.Name}
	return nil
}

// StreamOptions is OpenAI's stream_options.
type StreamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

// SamplingFields are the request fields shared by chat and completions.
type SamplingFields struct {
	Model               string          `json:"model"`
	MaxTokens           *int            `json:"max_tokens"`
	MaxCompletionTokens *int            `json:"max_completion_tokens"`
	Temperature         *float64        `json:"temperature"`
	TopP                *float64        `json:"top_p"`
	TopK                *int            `json:"top_k"`
	Seed                *int64          `json:"seed"`
	Stop                StopList        `json:"stop"`
	StopTokenIDs        []int           `json:"stop_token_ids"`
	Stream              bool            `json:"stream"`
	StreamOptions       *StreamOptions  `json:"stream_options"`
	IgnoreEOS           bool            `json:"ignore_eos"`
	MinTokens           int             `json:"min_tokens"`
	N                   *int            `json:"n"`
	Logprobs            json.RawMessage `json:"logprobs"`
	SkipSpecialTokens   *bool           `json:"skip_special_tokens"`
	// Accepted only at their neutral values: the engine does not implement
	// them, and ignoring them silently would answer a different request.
	PresencePenalty   *float64        `json:"presence_penalty"`
	FrequencyPenalty  *float64        `json:"frequency_penalty"`
	RepetitionPenalty *float64        `json:"repetition_penalty"`
	LogitBias         map[string]any  `json:"logit_bias"`
	ResponseFormat    json.RawMessage `json:"response_format"`
}

// ChatRequest is the body of POST /v1/chat/completions.
type ChatRequest struct {
	SamplingFields
	Messages            []chat.Message `json:"messages"`
	Tools               []chat.Tool    `json:"tools"`
	ToolChoice          ToolChoice     `json:"tool_choice"`
	ChatTemplateKwargs  map[string]any `json:"chat_template_kwargs"`
	AddGenerationPrompt *bool          `json:"add_generation_prompt"`
}

// CompletionRequest is the body of POST /v1/completions.
type CompletionRequest struct {
	SamplingFields
	Prompt json.RawMessage `json:"prompt"`
	Echo   bool            `json:"echo"`
	Suffix *string         `json:"suffix"`
}

// maxStopStrings bounds the stop list so matching stays cheap.
const maxStopStrings = 16

// decodeJSON decodes a request body; any failure is a 400 APIError.
func decodeJSON(body []byte, v any) *APIError {
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(v); err != nil {
		return badRequest("", "invalid JSON body: %v", err)
	}
	if dec.More() {
		return badRequest("", "invalid JSON body: trailing data after the object")
	}
	return nil
}

// DecodeChatRequest parses and validates a chat request body.
func DecodeChatRequest(body []byte) (*ChatRequest, *APIError) {
	var req ChatRequest
	if err := decodeJSON(body, &req); err != nil {
		return nil, err
	}
	if len(req.Messages) == 0 {
		return nil, badRequest("messages", "messages must be a non-empty list")
	}
	for i, m := range req.Messages {
		switch m.Role {
		case "system", "user", "assistant", "tool", "developer":
		default:
			return nil, badRequest("messages", "messages[%d].role %q is not system, user, assistant or tool", i, m.Role)
		}
	}
	for i, t := range req.Tools {
		if t.Type != "" && t.Type != "function" {
			return nil, badRequest("tools", "tools[%d].type %q is not function", i, t.Type)
		}
		if t.Function.Name == "" {
			return nil, badRequest("tools", "tools[%d].function.name is empty", i)
		}
	}
	if req.ToolChoice.Mode == "function" && findTool(req.Tools, req.ToolChoice.Function) < 0 {
		return nil, badRequest("tool_choice", "tool_choice names function %q that is not in tools", req.ToolChoice.Function)
	}
	if req.ToolChoice.Mode == "required" && len(req.Tools) == 0 {
		return nil, badRequest("tool_choice", `tool_choice "required" needs tools`)
	}
	if err := req.SamplingFields.validate(); err != nil {
		return nil, err
	}
	return &req, nil
}

func findTool(tools []chat.Tool, name string) int {
	for i, t := range tools {
		if t.Function.Name == name {
			return i
		}
	}
	return -1
}

// DecodeCompletionRequest parses and validates a completion request body.
func DecodeCompletionRequest(body []byte) (*CompletionRequest, *APIError) {
	var req CompletionRequest
	if err := decodeJSON(body, &req); err != nil {
		return nil, err
	}
	if len(bytes.TrimSpace(req.Prompt)) == 0 || bytes.Equal(bytes.TrimSpace(req.Prompt), []byte("null")) {
		return nil, badRequest("prompt", "prompt is required")
	}
	if req.Echo {
		return nil, badRequest("echo", "echo is not supported")
	}
	if req.Suffix != nil && *req.Suffix != "" {
		return nil, badRequest("suffix", "suffix is not supported")
	}
	if err := req.SamplingFields.validate(); err != nil {
		return nil, err
	}
	return &req, nil
}

// promptInput is a completion prompt: text or token ids.
type promptInput struct {
	Text string
	IDs  []int
}

// parsePrompt accepts a string, a list of one string, a list of token ids or
// a list of one list of ids (several prompts in one request are refused).
func parsePrompt(raw json.RawMessage) (promptInput, *APIError) {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return promptInput{Text: s}, nil
	}
	var ids []int
	if json.Unmarshal(raw, &ids) == nil {
		return promptInput{IDs: ids}, nil
	}
	var ss []string
	if json.Unmarshal(raw, &ss) == nil {
		if len(ss) != 1 {
			return promptInput{}, badRequest("prompt", "exactly one prompt per request is supported, got %d", len(ss))
		}
		return promptInput{Text: ss[0]}, nil
	}
	var idss [][]int
	if json.Unmarshal(raw, &idss) == nil {
		if len(idss) != 1 {
			return promptInput{}, badRequest("prompt", "exactly one prompt per request is supported, got %d", len(idss))
		}
		return promptInput{IDs: idss[0]}, nil
	}
	return promptInput{}, badRequest("prompt", "prompt must be a string, a list of token ids, or a list of one of those")
}

func (f *SamplingFields) validate() *APIError {
	if f.N != nil && *f.N != 1 {
		return badRequest("n", "only n=1 is supported")
	}
	if len(f.Logprobs) > 0 && !bytes.Equal(f.Logprobs, []byte("false")) && !bytes.Equal(f.Logprobs, []byte("null")) {
		return badRequest("logprobs", "logprobs are not supported")
	}
	if f.PresencePenalty != nil && *f.PresencePenalty != 0 {
		return badRequest("presence_penalty", "presence_penalty is not supported (only 0)")
	}
	if f.FrequencyPenalty != nil && *f.FrequencyPenalty != 0 {
		return badRequest("frequency_penalty", "frequency_penalty is not supported (only 0)")
	}
	if f.RepetitionPenalty != nil && *f.RepetitionPenalty != 1 {
		return badRequest("repetition_penalty", "repetition_penalty is not supported (only 1)")
	}
	if len(f.LogitBias) > 0 {
		return badRequest("logit_bias", "logit_bias is not supported")
	}
	if len(f.ResponseFormat) > 0 && !bytes.Equal(f.ResponseFormat, []byte("null")) {
		var rf struct {
			Type string `json:"type"`
		}
		if json.Unmarshal(f.ResponseFormat, &rf) != nil || rf.Type != "text" {
			return badRequest("response_format", `response_format other than {"type":"text"} is not supported`)
		}
	}
	if f.MaxTokens != nil && *f.MaxTokens < 1 {
		return badRequest("max_tokens", "max_tokens must be at least 1, got %d", *f.MaxTokens)
	}
	if f.MaxCompletionTokens != nil && *f.MaxCompletionTokens < 1 {
		return badRequest("max_completion_tokens", "max_completion_tokens must be at least 1, got %d", *f.MaxCompletionTokens)
	}
	if t := f.Temperature; t != nil && (math.IsNaN(*t) || *t < 0 || *t > 2) {
		return badRequest("temperature", "temperature must be in [0, 2], got %v", *t)
	}
	if p := f.TopP; p != nil && (math.IsNaN(*p) || *p <= 0 || *p > 1) {
		return badRequest("top_p", "top_p must be in (0, 1], got %v", *p)
	}
	if k := f.TopK; k != nil && *k < -1 {
		return badRequest("top_k", "top_k must be -1 (disabled), 0 (disabled) or positive, got %d", *k)
	}
	if f.MinTokens < 0 {
		return badRequest("min_tokens", "min_tokens must be non-negative, got %d", f.MinTokens)
	}
	if mt := f.maxTokens(); mt > 0 && f.MinTokens > mt {
		return badRequest("min_tokens", "min_tokens (%d) must not exceed max_tokens (%d)", f.MinTokens, mt)
	}
	if len(f.Stop) > maxStopStrings {
		return badRequest("stop", "at most %d stop strings are supported, got %d", maxStopStrings, len(f.Stop))
	}
	for _, s := range f.Stop {
		if s == "" {
			return badRequest("stop", "stop strings must not be empty")
		}
	}
	if f.StreamOptions != nil && !f.Stream {
		return badRequest("stream_options", "stream_options is only allowed when stream is true")
	}
	return nil
}

// maxTokens is max_completion_tokens, else max_tokens, else 0 (not set).
func (f *SamplingFields) maxTokens() int {
	if f.MaxCompletionTokens != nil {
		return *f.MaxCompletionTokens
	}
	if f.MaxTokens != nil {
		return *f.MaxTokens
	}
	return 0
}

func (f *SamplingFields) includeUsage() bool {
	return f.Stream && f.StreamOptions != nil && f.StreamOptions.IncludeUsage
}

// modelMatches reports whether the requested model is served (empty means the default).
func modelMatches(requested string, served []string) bool {
	if requested == "" {
		return true
	}
	for _, s := range served {
		if requested == s {
			return true
		}
	}
	return false
}

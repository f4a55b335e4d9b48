package serve

import (
	"net/http"
	"strings"
	"time"

	"github.com/glmtopo/glmtopo/parallel"
	"github.com/glmtopo/glmtopo/serve/chat"
	"github.com/glmtopo/glmtopo/serve/glm45"
)

type functionOut struct {
	Name      string `json:"name"`
	Arguments string `json:"arguments"`
}

type toolCallOut struct {
	ID       string      `json:"id"`
	Type     string      `json:"type"`
	Function functionOut `json:"function"`
}

type chatMessageOut struct {
	Role             string        `json:"role"`
	Content          *string       `json:"content"`
	ReasoningContent *string       `json:"reasoning_content,omitempty"`
	ToolCalls        []toolCallOut `json:"tool_calls,omitempty"`
}

type chatChoice struct {
	Index        int            `json:"index"`
	Message      chatMessageOut `json:"message"`
	FinishReason string         `json:"finish_reason"`
	Logprobs     *struct{}      `json:"logprobs"`
}

// ChatResponse is a non-streaming chat completion.
type chatResponse struct {
	ID      string       `json:"id"`
	Object  string       `json:"object"`
	Created int64        `json:"created"`
	Model   string       `json:"model"`
	Choices []chatChoice `json:"choices"`
	Usage   *Usage       `json:"usage"`
}

type functionDeltaOut struct {
	Name      string `json:"name,omitempty"`
	Arguments string `json:"arguments"`
}

type toolCallDeltaOut struct {
	Index    int              `json:"index"`
	ID       string           `json:"id,omitempty"`
	Type     string           `json:"type,omitempty"`
	Function functionDeltaOut `json:"function"`
}

type chatDelta struct {
	Role             string             `json:"role,omitempty"`
	Content          *string            `json:"content,omitempty"`
	ReasoningContent *string            `json:"reasoning_content,omitempty"`
	ToolCalls        []toolCallDeltaOut `json:"tool_calls,omitempty"`
}

type chatChunkChoice struct {
	Index        int       `json:"index"`
	Delta        chatDelta `json:"delta"`
	FinishReason *string   `json:"finish_reason"`
	Logprobs     *struct{} `json:"logprobs"`
}

type chatChunk struct {
	ID      string            `json:"id"`
	Object  string            `json:"object"`
	Created int64             `json:"created"`
	Model   string            `json:"model"`
	Choices []chatChunkChoice `json:"choices"`
	Usage   *Usage            `json:"usage,omitempty"`
}

// chatPlan is a validated chat request turned into an engine request.
type chatPlan struct {
	req       parallel.Request
	parserOpt glm45.Options
	prefill   string // assistant text already in the prompt that the parser must see
	stop      []string
	skipID    func(int) bool
}

// planChat renders the prompt and decides how tools and reasoning are parsed.
//
// tool_choice: "none" leaves the tools out of the prompt and parses no
// calls; "auto" (the default with tools) needs --enable-auto-tool-choice;
// "required" and a named function make a call happen by prefilling the
// assistant turn with "<think></think>\n<tool_call>" (and the name plus a
// newline for a named function), so the model can only continue a call.
func (s *Server) planChat(cr *ChatRequest) (*chatPlan, *APIError) {
	tools := cr.Tools
	mode := cr.ToolChoice.Mode
	if len(tools) == 0 {
		mode = "none"
	} else if mode == "" {
		mode = "auto"
	}
	if mode != "none" && s.cfg.ToolCallParser == "" {
		return nil, badRequest("tool_choice", `tool_choice %q needs the server started with --tool-call-parser glm45`, mode)
	}
	if mode == "auto" && !s.cfg.EnableAutoToolChoice {
		return nil, badRequest("tool_choice", `"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set`)
	}
	if mode == "none" {
		tools = nil
	}
	opt := chat.Options{AddGenerationPrompt: true, Kwargs: cr.ChatTemplateKwargs}
	if cr.AddGenerationPrompt != nil {
		opt.AddGenerationPrompt = *cr.AddGenerationPrompt
	}
	if v, ok := cr.ChatTemplateKwargs["enable_thinking"]; ok {
		b, isBool := v.(bool)
		if !isBool {
			return nil, badRequest("chat_template_kwargs", "chat_template_kwargs.enable_thinking must be a boolean")
		}
		opt.EnableThinking = &b
	}
	prompt, err := chat.Render(cr.Messages, tools, opt)
	if err != nil {
		return nil, badRequest("messages", "render chat template: %v", err)
	}

	p := &chatPlan{}
	trimmed := strings.TrimRight(prompt, " \n")
	thinkingDisabled := strings.HasSuffix(trimmed, glm45.ThinkStart+glm45.ThinkEnd)
	startInReasoning := !thinkingDisabled && strings.HasSuffix(trimmed, glm45.ThinkStart)
	if mode == "required" || mode == "function" {
		switch {
		case thinkingDisabled:
			prompt += "\n"
		case startInReasoning:
			prompt += glm45.ThinkEnd + "\n"
		default:
			prompt += "\n" + glm45.ThinkStart + glm45.ThinkEnd + "\n"
		}
		p.prefill = glm45.ToolCallStart
		if mode == "function" {
			p.prefill += cr.ToolChoice.Function + "\n"
		}
		prompt += p.prefill
		thinkingDisabled, startInReasoning = true, false
	}
	p.parserOpt = glm45.Options{
		Reasoning:        s.cfg.ReasoningParser == "glm45",
		ThinkingDisabled: thinkingDisabled,
		StartInReasoning: startInReasoning,
		ToolCalls:        mode != "none",
	}
	for _, t := range tools {
		p.parserOpt.Tools = append(p.parserOpt.Tools, glm45.Tool{Name: t.Function.Name, Parameters: t.Function.Parameters})
	}

	ids := s.tok.Encode(prompt)
	maxTokens, e := s.checkLength(len(ids), cr.maxTokens())
	if e != nil {
		return nil, e
	}
	if e := s.checkIDs(cr.StopTokenIDs); e != nil {
		e.Param = "stop_token_ids"
		return nil, e
	}
	p.req = parallel.Request{
		PromptIDs:    ids,
		Sampling:     samplingParams(&cr.SamplingFields),
		MaxNewTokens: maxTokens,
		MinNewTokens: cr.MinTokens,
		IgnoreEOS:    cr.IgnoreEOS,
		StopTokenIDs: cr.StopTokenIDs,
	}
	p.stop = cr.Stop
	keepSpecial := cr.SkipSpecialTokens != nil && !*cr.SkipSpecialTokens
	p.skipID = func(id int) bool {
		if s.eos[id] {
			return true
		}
		return s.tok.IsSpecial(id) && !s.markupIDs[id] && !keepSpecial
	}
	return p, nil
}

func (s *Server) handleChat(w http.ResponseWriter, r *http.Request) {
	arrival := time.Now()
	body, e := readBody(w, r)
	if e != nil {
		s.writeError(w, e)
		return
	}
	cr, e := DecodeChatRequest(body)
	if e != nil {
		s.writeError(w, e)
		return
	}
	if e := s.checkModel(cr.Model); e != nil {
		s.writeError(w, e)
		return
	}
	plan, e := s.planChat(cr)
	if e != nil {
		s.writeError(w, e)
		return
	}
	release, e := s.acquire()
	if e != nil {
		s.writeError(w, e)
		return
	}
	defer release()

	model := s.responseModel(cr.Model)
	id := newID("chatcmpl-")
	created := time.Now().Unix()
	parser := glm45.NewParser(plan.parserOpt)
	var acc glm45.Accumulator
	sse := newSSEWriter(w)
	chunk := func(d chatDelta, finish *string) chatChunk {
		return chatChunk{ID: id, Object: "chat.completion.chunk", Created: created, Model: model,
			Choices: []chatChunkChoice{{Index: 0, Delta: d, FinishReason: finish}}}
	}
	sendDelta := func(d glm45.Delta) error {
		if d.Empty() {
			return nil
		}
		if !cr.Stream {
			acc.Add(d)
			return nil
		}
		return sse.send(chunk(deltaOut(d), nil))
	}
	roleSent := false
	startStream := func() error {
		if !cr.Stream || roleSent {
			return nil
		}
		roleSent = true
		empty := ""
		if err := sse.send(chunk(chatDelta{Role: "assistant", Content: &empty}, nil)); err != nil {
			return err
		}
		return sendDelta(parser.Feed(plan.prefill))
	}
	if !cr.Stream {
		acc.Add(parser.Feed(plan.prefill))
	} else if sse.open() != nil {
		return // the client is gone
	}
	g := &generation{
		req: plan.req, stop: plan.stop, skipID: plan.skipID, arrival: arrival,
		onFirstToken: startStream,
		onText:       func(text string) error { return sendDelta(parser.Feed(text)) },
	}
	res, err := s.run(r.Context(), g)
	if err != nil {
		s.failGeneration(w, r, sse, arrival, res, err)
		return
	}
	if err := startStream(); err != nil { // no token was generated
		return
	}
	if err := sendDelta(parser.Finish()); err != nil {
		return
	}
	reason := finishReason(res.Finish, parser.CalledTools())
	s.recordFinish(arrival, res, reason)
	usage := usageOf(res.PromptTokens, res.CompletionTokens)
	if cr.Stream {
		endStream(sse, chunk(chatDelta{}, &reason), cr.includeUsage(),
			chatChunk{ID: id, Object: "chat.completion.chunk", Created: created, Model: model, Choices: []chatChunkChoice{}, Usage: usage})
		return
	}
	out := acc.Result()
	msg := chatMessageOut{Role: "assistant"}
	if out.Content != "" || len(out.ToolCalls) == 0 {
		msg.Content = &out.Content
	}
	if out.Reasoning != "" {
		msg.ReasoningContent = &out.Reasoning
	}
	for _, c := range out.ToolCalls {
		msg.ToolCalls = append(msg.ToolCalls, toolCallOut{ID: c.ID, Type: "function", Function: functionOut{Name: c.Name, Arguments: c.Arguments}})
	}
	writeJSON(w, http.StatusOK, chatResponse{ID: id, Object: "chat.completion", Created: created, Model: model,
		Choices: []chatChoice{{Index: 0, Message: msg, FinishReason: reason}}, Usage: usage})
}

// deltaOut converts a parser delta to the wire form.
func deltaOut(d glm45.Delta) chatDelta {
	var out chatDelta
	if d.Content != "" {
		c := d.Content
		out.Content = &c
	}
	if d.Reasoning != "" {
		r := d.Reasoning
		out.ReasoningContent = &r
	}
	for _, tc := range d.ToolCalls {
		o := toolCallDeltaOut{Index: tc.Index, ID: tc.ID, Function: functionDeltaOut{Name: tc.Name, Arguments: tc.Arguments}}
		if tc.ID != "" {
			o.Type = "function"
		}
		out.ToolCalls = append(out.ToolCalls, o)
	}
	return out
}

// failGeneration answers an engine error: a real status before the stream
// started, an error event after; nothing when the client is gone.
func (s *Server) failGeneration(w http.ResponseWriter, r *http.Request, sse *sseWriter, arrival time.Time, res parallel.Result, err error) {
	e := engineError(r.Context(), err)
	if e == nil {
		s.recordFinish(arrival, res, "abort")
		s.log.Debug("client went away", "path", r.URL.Path, "err", err)
		return
	}
	if e.Status >= 500 && e.Status != http.StatusServiceUnavailable { // 503s are counted by s.overload
		s.log.Error("generation failed", "path", r.URL.Path, "err", err)
	}
	if e.Status == http.StatusServiceUnavailable && sse.started {
		s.overload.add("refused")
	}
	if !sse.started {
		s.writeError(w, e)
		return
	}
	s.metrics.requestErrors.WithLabelValues("stream").Inc()
	_ = sse.send(e.body())
	_ = sse.done()
}

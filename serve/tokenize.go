package serve

import (
	"encoding/json"
	"net/http"

	"github.com/glmtopo/glmtopo/serve/chat"
)

// tokenizeRequest is vLLM's /tokenize body: a completion prompt, or chat
// messages rendered with the template.
type tokenizeRequest struct {
	Model               string          `json:"model"`
	Prompt              *string         `json:"prompt"`
	Messages            []chat.Message  `json:"messages"`
	Tools               []chat.Tool     `json:"tools"`
	AddGenerationPrompt *bool           `json:"add_generation_prompt"`
	ChatTemplateKwargs  map[string]any  `json:"chat_template_kwargs"`
	ReturnTokenStrs     bool            `json:"return_token_strs"`
	AddSpecialTokens    json.RawMessage `json:"add_special_tokens"` // accepted; GLM-4.5 adds none
}

type tokenizeResponse struct {
	Tokens      []int    `json:"tokens"`
	Count       int      `json:"count"`
	MaxModelLen int      `json:"max_model_len"`
	TokenStrs   []string `json:"token_strs,omitempty"`
}

func (s *Server) handleTokenize(w http.ResponseWriter, r *http.Request) {
	body, e := readBody(w, r)
	if e != nil {
		s.writeError(w, e)
		return
	}
	var req tokenizeRequest
	if e := decodeJSON(body, &req); e != nil {
		s.writeError(w, e)
		return
	}
	if e := s.checkModel(req.Model); e != nil {
		s.writeError(w, e)
		return
	}
	var text string
	switch {
	case req.Prompt != nil && req.Messages != nil:
		s.writeError(w, badRequest("prompt", "give either prompt or messages, not both"))
		return
	case req.Prompt != nil:
		text = *req.Prompt
	case req.Messages != nil:
		opt := chat.Options{AddGenerationPrompt: true, Kwargs: req.ChatTemplateKwargs}
		if req.AddGenerationPrompt != nil {
			opt.AddGenerationPrompt = *req.AddGenerationPrompt
		}
		if v, ok := req.ChatTemplateKwargs["enable_thinking"]; ok {
			b, isBool := v.(bool)
			if !isBool {
				s.writeError(w, badRequest("chat_template_kwargs", "chat_template_kwargs.enable_thinking must be a boolean"))
				return
			}
			opt.EnableThinking = &b
		}
		rendered, err := chat.Render(req.Messages, req.Tools, opt)
		if err != nil {
			s.writeError(w, badRequest("messages", "render chat template: %v", err))
			return
		}
		text = rendered
	default:
		s.writeError(w, badRequest("prompt", "prompt or messages is required"))
		return
	}
	ids := s.tok.Encode(text)
	resp := tokenizeResponse{Tokens: ids, Count: len(ids), MaxModelLen: s.maxModelLen}
	if resp.Tokens == nil {
		resp.Tokens = []int{}
	}
	if req.ReturnTokenStrs {
		for _, id := range ids {
			t, _ := s.tok.TokenText(id)
			resp.TokenStrs = append(resp.TokenStrs, t)
		}
	}
	writeJSON(w, http.StatusOK, resp)
}

func (s *Server) handleDetokenize(w http.ResponseWriter, r *http.Request) {
	body, e := readBody(w, r)
	if e != nil {
		s.writeError(w, e)
		return
	}
	var req struct {
		Model  string `json:"model"`
		Tokens []int  `json:"tokens"`
	}
	if e := decodeJSON(body, &req); e != nil {
		s.writeError(w, e)
		return
	}
	if e := s.checkModel(req.Model); e != nil {
		s.writeError(w, e)
		return
	}
	if e := s.checkIDs(req.Tokens); e != nil {
		e.Param = "tokens"
		s.writeError(w, e)
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"prompt": s.tok.Decode(req.Tokens)})
}

package serve

import (
	"net/http"
	"strings"
	"time"

	"github.com/glmtopo/glmtopo/parallel"
)

type completionChoice struct {
	Index        int       `json:"index"`
	Text         string    `json:"text"`
	FinishReason *string   `json:"finish_reason"`
	Logprobs     *struct{} `json:"logprobs"`
}

type completionResponse struct {
	ID      string             `json:"id"`
	Object  string             `json:"object"`
	Created int64              `json:"created"`
	Model   string             `json:"model"`
	Choices []completionChoice `json:"choices"`
	Usage   *Usage             `json:"usage,omitempty"`
}

// handleCompletions serves POST /v1/completions: raw text in, raw text out
// (special tokens are skipped unless skip_special_tokens is false, as in vLLM).
func (s *Server) handleCompletions(w http.ResponseWriter, r *http.Request) {
	arrival := time.Now()
	body, e := readBody(w, r)
	if e != nil {
		s.writeError(w, e)
		return
	}
	cr, e := DecodeCompletionRequest(body)
	if e != nil {
		s.writeError(w, e)
		return
	}
	if e := s.checkModel(cr.Model); e != nil {
		s.writeError(w, e)
		return
	}
	prompt, e := parsePrompt(cr.Prompt)
	if e != nil {
		s.writeError(w, e)
		return
	}
	ids := prompt.IDs
	if prompt.IDs == nil {
		ids = s.tok.Encode(prompt.Text)
	} else if e := s.checkIDs(ids); e != nil {
		s.writeError(w, e)
		return
	}
	maxTokens := cr.maxTokens()
	if maxTokens == 0 {
		maxTokens = 16 // OpenAI's default for completions
		if len(ids)+maxTokens > s.maxModelLen {
			maxTokens = max(1, s.maxModelLen-len(ids))
		}
	}
	maxTokens, e = s.checkLength(len(ids), maxTokens)
	if e != nil {
		e.Param = "prompt"
		s.writeError(w, e)
		return
	}
	if e := s.checkIDs(cr.StopTokenIDs); e != nil {
		e.Param = "stop_token_ids"
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
	id := newID("cmpl-")
	created := time.Now().Unix()
	keepSpecial := cr.SkipSpecialTokens != nil && !*cr.SkipSpecialTokens
	var text strings.Builder
	sse := newSSEWriter(w)
	chunk := func(t string, finish *string) completionResponse {
		return completionResponse{ID: id, Object: "text_completion", Created: created, Model: model,
			Choices: []completionChoice{{Index: 0, Text: t, FinishReason: finish}}}
	}
	g := &generation{
		req: parallel.Request{
			PromptIDs:    ids,
			Sampling:     samplingParams(&cr.SamplingFields),
			MaxNewTokens: maxTokens,
			MinNewTokens: cr.MinTokens,
			IgnoreEOS:    cr.IgnoreEOS,
			StopTokenIDs: cr.StopTokenIDs,
		},
		stop:    cr.Stop,
		arrival: arrival,
		skipID: func(id int) bool {
			return s.eos[id] || (!keepSpecial && s.tok.IsSpecial(id))
		},
		onText: func(t string) error {
			if !cr.Stream {
				text.WriteString(t)
				return nil
			}
			return sse.send(chunk(t, nil))
		},
	}
	if cr.Stream && sse.open() != nil {
		return // the client is gone
	}
	res, err := s.run(r.Context(), g)
	if err != nil {
		s.failGeneration(w, r, sse, arrival, res, err)
		return
	}
	reason := finishReason(res.Finish, false)
	s.recordFinish(arrival, res, reason)
	usage := usageOf(res.PromptTokens, res.CompletionTokens)
	if cr.Stream {
		endStream(sse, chunk("", &reason), cr.includeUsage(),
			completionResponse{ID: id, Object: "text_completion", Created: created, Model: model, Choices: []completionChoice{}, Usage: usage})
		return
	}
	resp := chunk(text.String(), &reason)
	resp.Usage = usage
	writeJSON(w, http.StatusOK, resp)
}

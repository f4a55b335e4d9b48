// Package parallel runs GLM-4.5 layers: the paged KV cache, the continuous-
// batching scheduler and the engine with MTP speculative decoding (spec*.go);
// pipeline stages (stage*.go: the head's ring over TCP or NCCL links, executor
// stages, micro-batches in flight with pipeline/'s schedule, spec_pipe.go);
// and a stage's layers on several tensor/expert-parallel ranks (ranks.go,
// tp/; with rank 0 on the engine's backend and decode graphs over every
// rank: ranks_device.go), or on one GPU with a one-rank communicator
// (comm.go).
package parallel

import (
	"context"
	"errors"
)

// SamplingParams selects tokens for one sequence. Temperature 0 is greedy.
type SamplingParams struct {
	Temperature float32 // 0 = greedy (argmax)
	TopP        float32 // nucleus mass in (0,1]; 0 or 1 disables it
	TopK        int     // keep the K most likely tokens; 0 disables it
	Seed        int64   // used when HasSeed; otherwise a per-request random seed
	HasSeed     bool
}

// Request is one sequence to generate.
type Request struct {
	PromptIDs    []int
	Sampling     SamplingParams
	MaxNewTokens int   // > 0; the engine also stops at its max model length
	MinNewTokens int   // EOS and stop tokens are suppressed until this many were generated
	IgnoreEOS    bool  // never stop on EOS (benchmarks)
	StopTokenIDs []int // extra token ids that end the sequence (the token is not emitted)
}

// FinishReason says why a sequence ended, with OpenAI's names.
type FinishReason string

const (
	FinishStop   FinishReason = "stop"   // EOS, a stop token, or the caller asked to stop
	FinishLength FinishReason = "length" // MaxNewTokens or the context length reached
	FinishAbort  FinishReason = "abort"  // the context was cancelled
)

// Result summarises a finished sequence.
type Result struct {
	PromptTokens     int
	CompletionTokens int
	Finish           FinishReason
	// Speculative decoding statistics (zero when the engine does not speculate).
	DraftTokens    int
	AcceptedTokens int
}

// Generator is what the API layer serves: the single-process engine now,
// the distributed pipeline later. Implementations are safe for concurrent use.
type Generator interface {
	// Generate runs req and calls emit for every generated token, in order, from
	// the goroutine that called Generate. If emit returns ErrStopGeneration the
	// sequence ends with FinishStop; any other error ends it and is returned.
	// Cancelling ctx frees the sequence at once (Finish = FinishAbort, err = ctx.Err()).
	Generate(ctx context.Context, req Request, emit func(tokenID int) error) (Result, error)
	// MaxModelLen is the longest prompt + completion the engine accepts.
	MaxModelLen() int
	// EOSTokenIDs are the model's end-of-sequence ids.
	EOSTokenIDs() []int
}

var (
	// ErrStopGeneration is returned by an emit callback to end a sequence normally
	// (the API layer uses it for stop strings).
	ErrStopGeneration = errors.New("stop generation")
	// ErrSaturated means the engine's waiting queue is full; the API answers 429/503.
	ErrSaturated = errors.New("engine saturated: too many waiting requests")
	// ErrPromptTooLong means prompt + MaxNewTokens (at least one) does not fit MaxModelLen.
	ErrPromptTooLong = errors.New("prompt too long")
	// ErrInvalidRequest means the request is malformed (empty prompt, token id out of range, ...).
	ErrInvalidRequest = errors.New("invalid request")
)

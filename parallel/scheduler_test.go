package parallel

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/model/modeltest"
)

func fixtureScheduler(t *testing.T, opt SchedulerOptions) (*Scheduler, *modeltest.Golden) {
	root := filepath.Join("..", "testdata", "glm4moe", "tiny")
	e := loadFixtureEngine(t, filepath.Join(root, "model"))
	s := NewScheduler(e, opt)
	t.Cleanup(s.Close)
	return s, modeltest.OpenGolden(t, root)
}

func ints(v []int32) []int {
	out := make([]int, len(v))
	for i, x := range v {
		out[i] = int(x)
	}
	return out
}

func collect(ctx context.Context, s *Scheduler, req Request) ([]int, Result, error) {
	var got []int
	res, err := s.Generate(ctx, req, func(tok int) error {
		got = append(got, tok)
		return nil
	})
	return got, res, err
}

func TestSchedulerGreedyMatchesGoldenConcurrently(t *testing.T) {
	s, g := fixtureScheduler(t, SchedulerOptions{MaxNumSeqs: 8})
	// Every prompt four times at once: batching must not change any result.
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for rep := 0; rep < 4; rep++ {
		for i := 0; i < 4; i++ {
			prompt := ints(g.IDs(fmt.Sprintf("prompt_%d", i)))
			want := ints(g.IDs(fmt.Sprintf("greedy_%d", i)))
			wg.Add(1)
			go func() {
				defer wg.Done()
				got, res, err := collect(context.Background(), s, Request{PromptIDs: prompt, MaxNewTokens: 16, IgnoreEOS: true})
				switch {
				case err != nil:
					errs <- err
				case fmt.Sprint(got) != fmt.Sprint(want):
					errs <- fmt.Errorf("prompt %d: got %v want %v", i, got, want)
				case res.Finish != FinishLength || res.CompletionTokens != 16 || res.PromptTokens != len(prompt):
					errs <- fmt.Errorf("prompt %d: result %+v", i, res)
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if free := s.eng.KV.FreeBlocks(); free != s.eng.KV.NumBlocks {
		t.Errorf("%d of %d blocks free after all requests ended", free, s.eng.KV.NumBlocks)
	}
}

func TestSchedulerStops(t *testing.T) {
	s, g := fixtureScheduler(t, SchedulerOptions{})
	prompt := ints(g.IDs("prompt_1"))
	greedy := ints(g.IDs("greedy_1")) // 594 ×10, then 360, 95, ...
	ctx := context.Background()

	// A stop token ends the sequence without being emitted.
	got, res, err := collect(ctx, s, Request{PromptIDs: prompt, MaxNewTokens: 16, StopTokenIDs: []int{greedy[10]}})
	if err != nil || fmt.Sprint(got) != fmt.Sprint(greedy[:10]) || res.Finish != FinishStop || res.CompletionTokens != 11 {
		t.Errorf("stop token: got %v %+v %v", got, res, err)
	}
	// min_tokens bans the stop token until reached: token 11 (greedy 360) and 12 cannot stop.
	got, res, err = collect(ctx, s, Request{PromptIDs: prompt, MaxNewTokens: 12, MinNewTokens: 12, StopTokenIDs: []int{greedy[10]}})
	if err != nil || len(got) != 12 || got[10] == greedy[10] || res.Finish != FinishLength {
		t.Errorf("min tokens: got %v %+v %v", got, res, err)
	}
	// The callback can stop generation (stop strings in the API layer).
	n := 0
	res, err = s.Generate(ctx, Request{PromptIDs: prompt, MaxNewTokens: 16}, func(int) error {
		n++
		if n == 3 {
			return ErrStopGeneration
		}
		return nil
	})
	if err != nil || res.Finish != FinishStop || res.CompletionTokens != 3 {
		t.Errorf("callback stop: %+v %v", res, err)
	}
}

func TestSchedulerSampling(t *testing.T) {
	s, g := fixtureScheduler(t, SchedulerOptions{})
	prompt := ints(g.IDs("prompt_2"))
	ctx := context.Background()
	req := Request{PromptIDs: prompt, MaxNewTokens: 24, IgnoreEOS: true,
		Sampling: SamplingParams{Temperature: 1.5, TopP: 0.95, TopK: 50, Seed: 7, HasSeed: true}}
	a, _, err := collect(ctx, s, req)
	if err != nil {
		t.Fatal(err)
	}
	b, _, _ := collect(ctx, s, req)
	if fmt.Sprint(a) != fmt.Sprint(b) {
		t.Errorf("same seed, different tokens: %v vs %v", a, b)
	}
	req.Sampling.Seed = 8
	c, _, _ := collect(ctx, s, req)
	if fmt.Sprint(a) == fmt.Sprint(c) {
		t.Errorf("different seeds gave identical samples %v", a)
	}
	if fmt.Sprint(a) == fmt.Sprint(ints(g.IDs("greedy_2"))) {
		t.Errorf("temperature 1.5 sampled exactly the greedy tokens")
	}
}

func TestSchedulerErrors(t *testing.T) {
	s, _ := fixtureScheduler(t, SchedulerOptions{MaxModelLen: 64})
	ctx := context.Background()
	cases := []struct {
		name string
		req  Request
		want error
	}{
		{"empty", Request{}, ErrInvalidRequest},
		{"bad id", Request{PromptIDs: []int{5, 99999}}, ErrInvalidRequest},
		{"negative id", Request{PromptIDs: []int{-1}}, ErrInvalidRequest},
		{"too long", Request{PromptIDs: make([]int, 64)}, ErrPromptTooLong},
		{"bad top_p", Request{PromptIDs: []int{1}, Sampling: SamplingParams{TopP: 2}}, ErrInvalidRequest},
	}
	for _, c := range cases {
		if _, _, err := collect(ctx, s, c.req); !errors.Is(err, c.want) {
			t.Errorf("%s: err %v, want %v", c.name, err, c.want)
		}
	}
	// max_tokens beyond the context is clipped to it.
	_, res, err := collect(ctx, s, Request{PromptIDs: make([]int, 60), MaxNewTokens: 100, IgnoreEOS: true})
	if err != nil || res.CompletionTokens != 4 || res.Finish != FinishLength {
		t.Errorf("clip to context: %+v %v", res, err)
	}
}

func TestSchedulerCancelFreesAtOnce(t *testing.T) {
	s, g := fixtureScheduler(t, SchedulerOptions{})
	prompt := ints(g.IDs("prompt_3"))
	ctx, cancel := context.WithCancel(context.Background())
	n := 0
	res, err := s.Generate(ctx, Request{PromptIDs: prompt, MaxNewTokens: 3000, IgnoreEOS: true}, func(int) error {
		if n++; n == 5 {
			cancel()
		}
		return nil
	})
	if !errors.Is(err, context.Canceled) || res.Finish != FinishAbort {
		t.Fatalf("cancel: %+v %v", res, err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for s.Running.Load() != 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if s.Running.Load() != 0 {
		t.Fatal("cancelled sequence still running")
	}
}

func TestSchedulerSaturated(t *testing.T) {
	s, g := fixtureScheduler(t, SchedulerOptions{MaxNumSeqs: 1, MaxWaiting: 2})
	prompt := ints(g.IDs("prompt_0"))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	started := make(chan struct{})
	var once sync.Once
	// One running (blocked in its callback), two waiting: the fourth is refused.
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.Generate(ctx, Request{PromptIDs: prompt, MaxNewTokens: 1000, IgnoreEOS: true}, func(int) error {
			once.Do(func() { close(started) })
			<-ctx.Done()
			return ctx.Err()
		})
	}()
	<-started
	// The running request holds KV blocks for its whole length (1 + 1000 tokens).
	if u := s.KVCacheUsage(); u <= 0 || u > 1 {
		t.Errorf("KV cache usage %g with a 1001-token sequence running", u)
	}
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			collect(ctx, s, Request{PromptIDs: prompt, MaxNewTokens: 4})
		}()
	}
	deadline := time.Now().Add(2 * time.Second)
	for s.Waiting.Load() < 2 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if _, _, err := collect(ctx, s, Request{PromptIDs: prompt, MaxNewTokens: 4}); !errors.Is(err, ErrSaturated) {
		t.Errorf("fourth request: err %v, want ErrSaturated", err)
	}
	cancel()
	wg.Wait()
}

// Chunked prefill (8 prompt tokens per step) gives exactly the golden tokens,
// for several long prompts sharing steps with each other's decode.
func TestSchedulerChunkedPrefill(t *testing.T) {
	s, g := fixtureScheduler(t, SchedulerOptions{PrefillTokens: 8})
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for i := 0; i < 4; i++ {
		prompt := ints(g.IDs(fmt.Sprintf("prompt_%d", i)))
		want := ints(g.IDs(fmt.Sprintf("greedy_%d", i)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, _, err := collect(context.Background(), s, Request{PromptIDs: prompt, MaxNewTokens: 16, IgnoreEOS: true})
			if err != nil || fmt.Sprint(got) != fmt.Sprint(want) {
				errs <- fmt.Errorf("prompt %d (%d tokens): got %v want %v (%v)", i, len(prompt), got, want, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

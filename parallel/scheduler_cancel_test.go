package parallel

import (
	"path/filepath"
	"testing"
)

// An aborted request gets no more prefill chunks: the step that follows
// its cancellation skips it, even before the loop reaps it.
func TestCancelledPrefillGetsNoMoreChunks(t *testing.T) {
	e := loadFixtureEngine(t, filepath.Join("..", "testdata", "glm4moe", "tiny", "model"))
	s := NewScheduler(e, SchedulerOptions{MaxNumSeqs: 4, PrefillTokens: 16})
	s.Close() // drive admit and step by hand, without the loop
	prompt := make([]int, 100)
	for i := range prompt {
		prompt[i] = 1 + i%500
	}
	r := &request{req: Request{PromptIDs: prompt, MaxNewTokens: 4}, signal: make(chan struct{}, 1)}
	s.waiting = []*request{r}
	s.admit()
	if len(s.running) != 1 {
		t.Fatalf("%d running after admit", len(s.running))
	}
	if err := s.step(); err != nil {
		t.Fatal(err)
	}
	if r.prefilled != 16 {
		t.Fatalf("prefilled %d after one step, want 16", r.prefilled)
	}
	r.cancelled.Store(true)
	if err := s.step(); err != nil {
		t.Fatal(err)
	}
	if r.prefilled != 16 {
		t.Errorf("a cancelled request was prefilled to %d", r.prefilled)
	}
	s.reap()
	if len(s.running) != 0 || e.KV.FreeBlocks() != e.KV.NumBlocks {
		t.Errorf("after reap: %d running, %d of %d blocks free", len(s.running), e.KV.FreeBlocks(), e.KV.NumBlocks)
	}
}

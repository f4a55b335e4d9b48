package parallel

import (
	"fmt"
	"testing"
)

// TestStageStepStats: after a workload through 3 in-process stages, one
// step at a time and with micro-batches, every stage counted the same
// steps, and tokens equal to what the requests fed the model (each prompt
// and every generated token but the last); compute times and quantiles
// are set and ordered.
func TestStageStepStats(t *testing.T) {
	dir := fixtureDir("tiny")
	bounds := splitLayers(numLayers(t, dir), 3)
	for _, micro := range []int{1, 3} {
		t.Run(fmt.Sprintf("micro%d", micro), func(t *testing.T) {
			head, ring, stages := inProcessPipelineStages(t, dir, bounds, smallKV, RingOptions{MicroBatches: micro})
			s := NewScheduler(head, schedOpt)
			items := workload(head.Cfg.VocabSize)
			for i := range items {
				// A stop at the API layer may cost one more step (the
				// scheduler learns of it after feeding the token): no stops
				// here, so tokens fed are exact.
				items[i].stopAt = 0
			}
			got := runWorkload(t, s, items)
			s.Close()
			fed := int64(0)
			for i, r := range got {
				if r.err != nil || len(r.tokens) == 0 {
					t.Fatalf("request %d: %v, %d tokens", i, r.err, len(r.tokens))
				}
				fed += int64(len(items[i].req.PromptIDs) + len(r.tokens) - 1)
			}
			hs := ring.StepStats()
			all := []StepStats{hs}
			for _, st := range stages {
				all = append(all, st.StepStats())
			}
			for i, st := range all {
				if st.Steps == 0 || st.Steps != hs.Steps || st.Tokens != fed {
					t.Errorf("stage %d: %d steps, %d tokens; want the head's %d steps and %d tokens fed", i, st.Steps, st.Tokens, hs.Steps, fed)
				}
				if st.Busy <= 0 || st.StepP50 <= 0 || st.StepP99 < st.StepP50 || st.Idle <= 0 {
					t.Errorf("stage %d: busy %v, step p50 %v p99 %v, idle %v", i, st.Busy, st.StepP50, st.StepP99, st.Idle)
				}
				t.Logf("stage %d: %d steps, %d tokens, busy %v, p50 %v, p99 %v, idle %v", i, st.Steps, st.Tokens, st.Busy, st.StepP50, st.StepP99, st.Idle)
			}
			if st := stages[0].Stats(); st.Tokens != fed || st.StepP99 < st.StepP50 {
				t.Errorf("Stats %+v disagrees with StepStats", st)
			}
		})
	}
}

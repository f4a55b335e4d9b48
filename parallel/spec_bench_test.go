package parallel

import (
	"context"
	"fmt"
	"testing"

	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/model"
)

// BenchmarkSpecGenerate generates 64 tokens for each of `batch` concurrent
// requests on the CPU engine (the ~100M-parameter config of
// BenchmarkDecodeStep): without speculation, with the MTP layer's own
// drafts (random weights: almost none accepted), and with drafts that are
// always right (the plain run's output), the bound of what verification gains.
func BenchmarkSpecGenerate(b *testing.B) {
	dir := b.TempDir()
	if _, err := model.Synthesize(context.Background(), bench100M(), dir, model.SynthOptions{Seed: 1}); err != nil {
		b.Fatal(err)
	}
	const maxNew = 64
	for _, batch := range []int{1, 8} {
		reqs := make([]specRequest, batch)
		for i := range reqs {
			prompt := make([]int, 32)
			for j := range prompt {
				prompt[j] = (7*i + 13*j) % 1000
			}
			reqs[i] = specRequest{name: fmt.Sprint(i), req: Request{PromptIDs: prompt, MaxNewTokens: maxNew, IgnoreEOS: true}}
		}
		var plain []workResult
		for _, mode := range []string{"off", "mtp-1", "oracle-1", "oracle-3"} {
			b.Run(fmt.Sprintf("batch=%d/%s", batch, mode), func(b *testing.B) {
				e, closeEngine, err := OpenEngine(context.Background(), dir, cpu.New(0), EngineOptions{MaxTokens: 64 * 256}, nil)
				if err != nil {
					b.Fatal(err)
				}
				defer closeEngine()
				var spec SpecConfig
				switch mode {
				case "mtp-1", "oracle-1":
					spec = SpecConfig{"mtp", 1}
				case "oracle-3":
					spec = SpecConfig{"mtp", 3}
				}
				s := NewScheduler(e, SchedulerOptions{MaxNumSeqs: batch, Speculative: spec})
				defer s.Close()
				if mode == "oracle-1" || mode == "oracle-3" {
					s.spec.override = func(r *request, d []int32) {
						want := plain[r.req.PromptIDs[0]/7] // prompt[0] = 7i
						for j := range d {
							if k := r.generated + j; k < len(want.tokens) {
								d[j] = int32(want.tokens[k])
							}
						}
					}
				}
				b.ResetTimer()
				for range b.N {
					out := runSpecRequests(s, reqs)
					if mode == "off" {
						plain = out
					}
				}
				b.StopTimer()
				b.ReportMetric(float64(batch*maxNew*b.N)/b.Elapsed().Seconds(), "tokens/s")
				if st, ok := s.SpecDecodeStats(); ok {
					b.ReportMetric(float64(st.NumAcceptedTokens)/float64(max(1, st.NumDraftTokens)), "acceptance")
				}
			})
		}
	}
}

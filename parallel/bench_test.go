package parallel

import (
	"context"
	"fmt"
	"testing"

	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/model"
)

// bench100M is a GLM-4.5-shaped config of about 100M parameters.
func bench100M() *model.Config {
	c, _ := model.Preset("tiny")
	c = c.Clone()
	c.HiddenSize, c.IntermediateSize, c.MoEIntermediateSize = 512, 1536, 256
	c.NumHiddenLayers, c.NRoutedExperts, c.NumExpertsPerTok = 8, 32, 4
	c.NumAttentionHeads, c.NumKeyValueHeads, c.HeadDim = 8, 2, 64
	return c
}

// BenchmarkDecodeStep measures one decode step (every sequence at context 128)
// on the CPU engine for the tiny preset and a ~100M-parameter config.
func BenchmarkDecodeStep(b *testing.B) {
	tiny, _ := model.Preset("tiny")
	for _, m := range []struct {
		name string
		cfg  *model.Config
	}{{"tiny", tiny}, {"100M", bench100M()}} {
		dir := b.TempDir()
		cfg, err := model.Synthesize(context.Background(), m.cfg, dir, model.SynthOptions{Seed: 1})
		if err != nil {
			b.Fatal(err)
		}
		be := cpu.New(0)
		e, closeEngine, err := OpenEngine(context.Background(), dir, be, EngineOptions{MaxTokens: 64 * 256}, nil)
		if err != nil {
			b.Fatal(err)
		}
		for _, batch := range []int{1, 8, 32} {
			b.Run(fmt.Sprintf("%s/params=%s/batch=%d", m.name, model.HumanCount(cfg.Params().Main), batch), func(b *testing.B) {
				seqs := make([]*Seq, batch)
				prompt := make([]int32, 128)
				for i := range prompt {
					prompt[i] = int32(i % cfg.VocabSize)
				}
				for i := range seqs {
					seqs[i] = &Seq{}
					r, err := e.Step([]StepInput{{Seq: seqs[i], Tokens: prompt}}, false)
					if err != nil {
						b.Fatal(err)
					}
					r.Release()
				}
				inputs := make([]StepInput, batch)
				b.ResetTimer()
				for n := 0; n < b.N; n++ {
					for i, s := range seqs {
						s.Len = 128 // decode the same position again: constant context
						inputs[i] = StepInput{Seq: s, Tokens: []int32{int32(n % 100)}}
					}
					r, err := e.Step(inputs, false)
					if err != nil {
						b.Fatal(err)
					}
					r.Release()
				}
				b.StopTimer()
				b.ReportMetric(float64(batch)*float64(b.N)/b.Elapsed().Seconds(), "tokens/s")
				for _, s := range seqs {
					e.KV.Release(s)
				}
			})
		}
		closeEngine()
	}
}

package parallel

import (
	"context"
	"testing"

	"github.com/glmtopo/glmtopo/transport/tcp"
)

// BenchmarkPipelineDecodeStep times one decode step of 16 sequences of the
// tiny fixture: the single-process engine, and two stages joined by an
// in-process link and by a TCP link on loopback (the stage on a goroutine),
// to show what the ring adds per step (header, f32 rows both ways, checks).
func BenchmarkPipelineDecodeStep(b *testing.B) {
	dir := fixtureDir("tiny")
	run := func(b *testing.B, e *Engine) {
		const n = 16
		seqs := make([]Seq, n)
		inputs := make([]StepInput, n)
		for i := range inputs {
			inputs[i] = StepInput{Seq: &seqs[i], Tokens: []int32{int32(i + 1), 2, 3, 4}}
		}
		res, err := e.Step(inputs, false)
		if err != nil {
			b.Fatal(err)
		}
		res.Release()
		b.ResetTimer()
		for it := 0; it < b.N; it++ {
			if seqs[0].Len+1 >= 1000 {
				b.StopTimer()
				for i := range seqs {
					e.KV.Release(&seqs[i])
				}
				b.StartTimer()
			}
			for i := range inputs {
				inputs[i].Tokens = []int32{int32(it%1000 + 1)}
			}
			res, err := e.Step(inputs, false)
			if err != nil {
				b.Fatal(err)
			}
			res.Release()
		}
		b.StopTimer()
		for i := range seqs {
			e.KV.Release(&seqs[i])
		}
	}
	opt := EngineOptions{BlockSize: 16, MaxTokens: 32768}
	b.Run("one-process", func(b *testing.B) { run(b, wholeEngine(b, dir, opt)) })
	b.Run("2stages-inproc", func(b *testing.B) {
		head, _ := inProcessPipeline(b, dir, splitLayers(numLayers(b, dir), 2), opt)
		run(b, head)
	})
	b.Run("2stages-tcp", func(b *testing.B) {
		key := []byte("glmtopo-bench-pipeline-key-32byt")
		head := loadHeadEngine(b, dir, 2, opt)
		sbe, sw := loadFixtureSelection(b, dir, stageSelection(2, 4))
		st, err := NewStage(sbe, sw)
		if err != nil {
			b.Fatal(err)
		}
		defer st.Close()
		hl, err := ListenHead("127.0.0.1:0", tcp.Config{Name: "head", Key: key})
		if err != nil {
			b.Fatal(err)
		}
		defer hl.Close()
		sl, err := ListenStage("127.0.0.1:0", tcp.Config{Name: "stage", Key: key})
		if err != nil {
			b.Fatal(err)
		}
		defer sl.Close()
		done := make(chan error, 1)
		go func() { done <- sl.Serve(context.Background(), st, hl.Addr().String()) }()
		ring, err := ConnectRingTCP(context.Background(), head, hl, sl.Addr().String(), RingOptions{})
		if err != nil {
			b.Fatal(err)
		}
		run(b, head)
		ring.Close()
		if err := <-done; err != nil {
			b.Error(err)
		}
	})
}

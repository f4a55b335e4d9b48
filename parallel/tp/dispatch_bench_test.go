package tp

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
)

// benchBatch is seqs sequences of n new tokens each, from position 0, one
// sequence per run of 16-token blocks.
func benchBatch(seqs, n int) (*kernels.Batch, int) {
	per := (n + 15) / 16
	b := &kernels.Batch{}
	for s := 0; s < seqs; s++ {
		var table []int32
		for k := 0; k < per; k++ {
			table = append(table, int32(s*per+k))
		}
		b.BlockTables = append(b.BlockTables, table)
		b.ContextLens = append(b.ContextLens, int32(n))
		for p := 0; p < n; p++ {
			b.Positions = append(b.Positions, int32(p))
			b.SeqIndex = append(b.SeqIndex, int32(s))
			b.Slots = append(b.Slots, int32(s*per*16+p))
		}
	}
	return b, seqs * per
}

// BenchmarkDispatch compares the MoE dispatches on 4 CPU ranks (TP4, EP4:
// vLLM's --tensor-parallel-size 4 --enable-expert-parallel) of
// the tiny synthetic model (3 MoE layers), per step: a decode size (16
// sequences of one token) and a prefill size (one sequence of 512). For
// information: on CPU ranks in one process the "network" is a memory copy,
// so this weighs the compute each dispatch leaves to a rank (all T tokens'
// routing and a share of the expert rows for the all-reduce; T/ranks
// tokens' routing, packing and two exchanges for the all-to-all).
func BenchmarkDispatch(b *testing.B) {
	dir, cfg := synthModel(b, `{}`, "bf16")
	g, err := NewGrid(cfg, 0, cfg.NumHiddenLayers, 4, 4, 4, nil)
	if err != nil {
		b.Fatal(err)
	}
	for _, size := range []struct {
		name    string
		seqs, n int
	}{{"decode-T16", 16, 1}, {"prefill-T512", 1, 512}} {
		for _, d := range []string{DispatchAllReduce, DispatchAllToAll} {
			b.Run(fmt.Sprintf("%s/%s", size.name, d), func(b *testing.B) {
				gr, err := New(context.Background(), g, Options{NewBackend: cpuBackend, Load: loader(dir), Dispatch: d})
				if err != nil {
					b.Fatal(err)
				}
				defer gr.Close()
				batch, blocks := benchBatch(size.seqs, size.n)
				if err := gr.AllocKV(kernels.F32, blocks, 16); err != nil {
					b.Fatal(err)
				}
				in := input(rand.New(rand.NewPCG(1, 2)), batch.Tokens(), cfg.HiddenSize)
				h := make([]float32, len(in))
				b.ResetTimer()
				for range b.N {
					copy(h, in)
					if err := gr.Run(context.Background(), batch, h); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/float64(batch.Tokens()), "µs/token")
			})
		}
	}
}

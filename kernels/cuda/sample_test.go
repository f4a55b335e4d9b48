package cuda

import (
	"fmt"
	"math"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
)

// TestSampleTwin: sample_rows draws the token kernels/cpu.SampleRow draws
// from the same U, on vocabularies that cut its passes and blocks (1 to
// GLM-4.5's 151552), with temperatures, top-k (1, past the vocabulary),
// top-p, banned ids, greedy rows among sampled ones, tied logits (ties go
// by id), -inf logits, a flat row and peaked rows.
func TestSampleTwin(t *testing.T) {
	p := newPair(t)
	host := gpu(t, Options{HostSampling: true})
	for _, V := range []int{1, 7, 1031, 4097, 151552} {
		t.Run(fmt.Sprintf("V%d", V), func(t *testing.T) {
			const R = 48
			v := p.randF32(R*V, 4)
			params := make([]kernels.SampleParams, R)
			for r := range params {
				row := v[r*V : (r+1)*V]
				switch r % 6 {
				case 1: // ties: logits on a coarse grid
					for i := range row {
						row[i] = float32(math.Round(float64(row[i]))) / 2
					}
				case 2: // peaked, with -inf entries
					row[p.rng.IntN(V)] += 15
					for i := 0; i < V; i += 3 {
						row[i] = float32(math.Inf(-1))
					}
					row[V-1] = 1
				case 3: // flat
					for i := range row {
						row[i] = 0.25
					}
				}
				sp := kernels.SampleParams{
					Temperature: []float32{0, 0.3, 0.7, 1, 1.6}[r%5],
					TopK:        []int{0, 1, 5, 50, V - 1, V + 3, 0}[r%7],
					TopP:        []float32{0, 0.5, 0.9, 0.95, 1, 0.999}[p.rng.IntN(6)],
					U:           p.rng.Float32(),
				}
				if r%4 == 1 {
					sp.Ban = []int32{int32(p.rng.IntN(V)), int32(V - 1), -3, int32(V + 5), 0}
				}
				if r == R-1 {
					sp.U = math.Nextafter32(1, 0) // the very top of [0,1)
				}
				params[r] = sp
			}
			lg := p.upload(kernels.F32, f32Bytes(v), R, V)
			want, err := p.cpu.Sample(lg.c, params)
			must(t, "cpu sample", err)
			got, err := p.gpu.Sample(lg.g, params)
			must(t, "gpu sample", err)
			viaHost, err := host.Sample(upload(t, host, v, R, V), params)
			must(t, "host sample", err)
			for r := range want {
				if got[r] != want[r] || viaHost[r] != want[r] {
					t.Errorf("row %d %+v: gpu %d host path %d cpu %d", r, params[r], got[r], viaHost[r], want[r])
				}
			}
			// The draw follows U: across U the kernel returns more than one token on sampled rows.
			if V > 100 {
				seen := map[int32]bool{}
				for i := range 16 {
					sp := []kernels.SampleParams{{Temperature: 1, U: (float32(i) + 0.5) / 16}}
					one := p.upload(kernels.F32, f32Bytes(v[:V]), 1, V)
					g, err := p.gpu.Sample(one.g, sp)
					must(t, "gpu sample", err)
					c, err := p.cpu.Sample(one.c, sp)
					must(t, "cpu sample", err)
					if g[0] != c[0] {
						t.Errorf("U %v: gpu %d cpu %d", sp[0].U, g[0], c[0])
					}
					seen[g[0]] = true
				}
				if len(seen) < 4 {
					t.Errorf("16 values of U drew only %d distinct tokens", len(seen))
				}
			}
		})
	}
}

func upload(t *testing.T, b *Backend, v []float32, shape ...int) *kernels.Tensor {
	t.Helper()
	g, err := b.NewTensor(kernels.F32, shape...)
	must(t, "tensor", err)
	must(t, "upload", b.Upload(g, f32Bytes(v)))
	t.Cleanup(func() { b.Free(g) })
	return g
}

// BenchmarkSample times Sample (logits on the device to token ids on the
// host) over GLM-4.5's 151552-logit rows at temperature 0.7 with top-p 0.95
// or top-k 50, on the device (sample_rows) and through the CPU sampler
// (Options.HostSampling). Run with -test.bench Sample.
func BenchmarkSample(b *testing.B) {
	const V = 151552
	for _, path := range []string{"device", "host"} {
		g := gpu(b, Options{HostSampling: path == "host"})
		for _, R := range []int{1, 16, 64} {
			lg, err := g.NewTensor(kernels.F32, R, V)
			if err != nil {
				b.Fatal(err)
			}
			if err := g.Fill(lg, 7, 12); err != nil {
				b.Fatal(err)
			}
			for _, mode := range []string{"top-p", "top-k"} {
				params := make([]kernels.SampleParams, R)
				for r := range params {
					params[r] = kernels.SampleParams{Temperature: 0.7, TopP: 0.95, U: float32(r) / float32(R)}
					if mode == "top-k" {
						params[r].TopP, params[r].TopK = 0, 50
					}
				}
				b.Run(fmt.Sprintf("%s/%s/rows%d", path, mode, R), func(b *testing.B) {
					if _, err := g.Sample(lg, params); err != nil {
						b.Fatal(err)
					}
					b.ResetTimer()
					for range b.N {
						if _, err := g.Sample(lg, params); err != nil {
							b.Fatal(err)
						}
					}
				})
			}
			g.Free(lg)
		}
	}
}

// TestSampleArgs (no GPU): the rows' parameters as src/sample.cu's
// SampleArgs, each row's bans kept inside the vocabulary, sorted, after all rows.
func TestSampleArgs(t *testing.T) {
	params := []kernels.SampleParams{
		{Temperature: 0.7, TopP: 0.9, TopK: 40, U: 0.25, Ban: []int32{9, -1, 3, 100, 3}},
		{},
		{Temperature: 1, TopK: math.MaxInt64, Ban: []int32{0}},
	}
	args, bans := sampleArgs(params, 10)
	if len(args) != sampleArgsBytes*len(params) {
		t.Fatalf("args: %d bytes, want %d", len(args), sampleArgsBytes*len(params))
	}
	if fmt.Sprint(bans) != "[3 3 9 0]" {
		t.Fatalf("bans %v, want [3 3 9 0]", bans)
	}
	word := func(r, i int) uint32 {
		o := r*sampleArgsBytes + 4*i
		return uint32(args[o]) | uint32(args[o+1])<<8 | uint32(args[o+2])<<16 | uint32(args[o+3])<<24
	}
	for _, c := range []struct {
		r, i int
		want uint32
	}{
		{0, 0, math.Float32bits(0.7)}, {0, 1, math.Float32bits(0.9)}, {0, 2, 40}, {0, 3, math.Float32bits(0.25)}, {0, 4, 0}, {0, 5, 3},
		{1, 4, 3}, {1, 5, 3},
		{2, 2, math.MaxInt32}, {2, 4, 3}, {2, 5, 4},
	} {
		if got := word(c.r, c.i); got != c.want {
			t.Errorf("row %d field %d = %#x, want %#x", c.r, c.i, got, c.want)
		}
	}
}

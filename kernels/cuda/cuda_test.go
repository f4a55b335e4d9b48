package cuda

import (
	"encoding/binary"
	"errors"
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/model/modeltest"
)

// TestNoCUDAIsAClearError runs everywhere: without a driver New must fail
// with ErrNoCUDA and name the library; with one it must open a device.
func TestNoCUDAIsAClearError(t *testing.T) {
	b, err := New(Options{})
	if err == nil {
		defer b.Close()
		if b.Name() == "" || b.SMs() <= 0 {
			t.Fatalf("opened a device without a name or SMs: %q %d", b.Name(), b.SMs())
		}
		t.Logf("CUDA present: %s", b.Name())
		return
	}
	if !errors.Is(err, ErrNoCUDA) {
		t.Fatalf("New failed without wrapping ErrNoCUDA: %v", err)
	}
	if !strings.Contains(err.Error(), "libcuda") && !strings.Contains(err.Error(), "nvrtc") && !strings.Contains(err.Error(), "device") {
		t.Fatalf("error does not say what is missing: %v", err)
	}
	t.Logf("no CUDA: %v", err)
}

func TestSizeClass(t *testing.T) {
	for _, c := range []struct{ in, want uintptr }{{0, 512}, {1, 512}, {512, 512}, {513, 1024}, {1<<20 - 1, 1 << 20}, {1 << 20, 2 << 20},
		{(2 << 20) + 1, 4 << 20}, {5767168, 6 << 20}, {6 << 20, 6 << 20}} {
		if got := sizeClass(c.in); got != c.want {
			t.Errorf("sizeClass(%d) = %d, want %d", c.in, got, c.want)
		}
	}
}

// TestPoolFit: a request that misses its size class takes the smallest
// cached block at most an eighth larger, never a smaller or much larger one.
func TestPoolFit(t *testing.T) {
	p := newPool(nil)
	p.free[8<<20] = []uintptr{1}
	p.free[9<<20] = []uintptr{2}
	p.free[4<<20] = []uintptr{3}
	for _, c := range []struct{ in, want uintptr }{{8 << 20, 8 << 20}, {7680 << 10, 8 << 20}, {7 << 20, 0}, {8<<20 + 1, 9 << 20}, {10 << 20, 0}} {
		if got := p.fit(c.in, false); got != c.want {
			t.Errorf("fit(%d) = %d, want %d", c.in, got, c.want)
		}
	}
	if got := p.fit(1<<20, true); got != 4<<20 {
		t.Errorf("fit(1 MiB, any) = %d, want the smallest cached block, 4 MiB", got)
	}
}

// gpu opens device 0 or skips the test when there is no CUDA: cudatest.Open
// for this package, whose tests cannot import cudatest (it imports cuda).
func gpu(t testing.TB, opt Options) *Backend {
	t.Helper()
	b, err := New(opt)
	if errors.Is(err, ErrNoCUDA) {
		t.Skipf("no CUDA: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Error(err)
		}
	})
	return b
}

// twin holds one tensor on both backends.
type twin struct{ c, g *kernels.Tensor }

type pairT struct {
	t   *testing.T
	cpu *cpu.Backend
	gpu *Backend
	rng *rand.Rand
}

func newPair(t *testing.T) *pairT { return newPairOpt(t, Options{}) }

// newPairOpt pairs the CPU reference with a GPU backend opened with opt.
func newPairOpt(t *testing.T, opt Options) *pairT {
	return &pairT{t: t, cpu: cpu.New(2), gpu: gpu(t, opt), rng: rand.New(rand.NewPCG(1, uint64(len(t.Name()))))}
}

// sub is p reporting to subtest t.
func (p *pairT) sub(t *testing.T) *pairT {
	q := *p
	q.t = t
	return &q
}

func (p *pairT) upload(dt kernels.DType, data []byte, shape ...int) twin {
	p.t.Helper()
	c, err := p.cpu.NewTensor(dt, shape...)
	if err != nil {
		p.t.Fatal(err)
	}
	if err := p.cpu.Upload(c, data); err != nil {
		p.t.Fatal(err)
	}
	g, err := p.gpu.NewTensor(dt, shape...)
	if err != nil {
		p.t.Fatal(err)
	}
	if err := p.gpu.Upload(g, data); err != nil {
		p.t.Fatal(err)
	}
	return twin{c, g}
}

func f32Bytes(v []float32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return b
}

func i32Bytes(v []int32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], uint32(x))
	}
	return b
}

func (p *pairT) randF32(n int, scale float32) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = (p.rng.Float32()*2 - 1) * scale
	}
	return v
}

func (p *pairT) f32(scale float32, shape ...int) twin {
	n := 1
	for _, d := range shape {
		n *= d
	}
	return p.upload(kernels.F32, f32Bytes(p.randF32(n, scale)), shape...)
}

// poisoned is an output tensor filled with NaN on both backends, so an unwritten element fails the comparison.
func (p *pairT) poisoned(shape ...int) twin {
	n := 1
	for _, d := range shape {
		n *= d
	}
	v := make([]float32, n)
	for i := range v {
		v[i] = float32(math.NaN())
	}
	return p.upload(kernels.F32, f32Bytes(v), shape...)
}

func (p *pairT) i32(v []int32, shape ...int) twin {
	return p.upload(kernels.I32, i32Bytes(v), shape...)
}

// weight makes a random [n,k] weight in dt (F8E4M3 with the given scale layout).
func (p *pairT) weight(dt kernels.DType, layout kernels.ScaleLayout, block [2]int, n, k int) twin {
	p.t.Helper()
	scale := float32(1 / math.Sqrt(float64(k)))
	var w twin
	switch dt {
	case kernels.F32:
		return p.f32(scale, n, k)
	case kernels.BF16:
		b := make([]byte, 2*n*k)
		for i := 0; i < n*k; i++ {
			binary.LittleEndian.PutUint16(b[2*i:], uint16(math.Float32bits((p.rng.Float32()*2-1)*scale)>>16))
		}
		w = p.upload(kernels.BF16, b, n, k)
		return w
	}
	b := make([]byte, n*k)
	for i := range b {
		q := byte(p.rng.IntN(256))
		if q&0x7f == 0x7f {
			q ^= 1
		}
		b[i] = q
	}
	w = p.upload(kernels.F8E4M3, b, n, k)
	var s twin
	if layout == kernels.ScalePerChannel {
		s = p.upload(kernels.F32, f32Bytes(p.randF32(n, scale/100)), n)
	} else {
		rows, cols := (n+block[0]-1)/block[0], (k+block[1]-1)/block[1]
		s = p.upload(kernels.F32, f32Bytes(p.randF32(rows*cols, scale/100)), rows, cols)
	}
	for _, x := range []*kernels.Tensor{w.c, w.g} {
		x.ScaleLayout, x.ScaleBlock = layout, block
	}
	w.c.Scale, w.g.Scale = s.c, s.g
	return w
}

// check downloads both sides of x and compares them.
func (p *pairT) check(what string, x twin, tol float64) {
	p.t.Helper()
	want, err := p.cpu.Download(x.c)
	if err != nil {
		p.t.Fatal(err)
	}
	got, err := p.gpu.Download(x.g)
	if err != nil {
		p.t.Fatalf("%s: %v", what, err)
	}
	if r := modeltest.RelErr(got, want); r > tol {
		p.t.Errorf("%s: rel err %.3g > %g", what, r, tol)
	}
}

func must(t *testing.T, what string, errs ...error) {
	t.Helper()
	for _, err := range errs {
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
}

func TestSgWarpsPerUnit(t *testing.T) {
	for _, c := range []struct{ chunks, want int }{{128, 8}, {64, 8}, {63, 4}, {44, 4}, {22, 2}, {15, 1}, {1, 1}} {
		if got := sgWarpsPerUnit(c.chunks); got != c.want {
			t.Errorf("sgWarpsPerUnit(%d) = %d, want %d", c.chunks, got, c.want)
		}
	}
}

func TestSgSplits(t *testing.T) {
	for _, c := range []struct{ units, blocks, chunks, want int }{
		{10000, 396, 128, 1}, // enough units
		{16, 396, 128, 8},    // few units: split K (down to two chunks per warp)
		{704, 396, 128, 1},   // 1.8 waves either way: keep K whole
		{1, 396, 10, 1},      // too short to split
	} {
		if got := sgSplits(c.units, c.blocks, c.chunks); got != c.want {
			t.Errorf("sgSplits(%d, %d, %d) = %d, want %d", c.units, c.blocks, c.chunks, got, c.want)
		}
	}
}

// TestTensorArgs (no GPU): addresses in order, nil optional tensors as 0, and
// the first bad argument's error kept (later ones resolve to 0, unchecked).
func TestTensorArgs(t *testing.T) {
	f32 := &kernels.Tensor{DType: kernels.F32, Shape: []int{4}, Impl: &buf{ptr: 0x1000}}
	i32 := &kernels.Tensor{DType: kernels.I32, Shape: []int{4}, Impl: &buf{ptr: 0x2000}}
	var ta tensorArgs
	if p, q, o := ta.ptr(f32, kernels.F32, "x"), ta.ptr(i32, kernels.I32, "ids"), ta.opt(nil, "bias"); p != 0x1000 || q != 0x2000 || o != 0 || ta.err != nil {
		t.Fatalf("got %#x %#x %#x, err %v", p, q, o, ta.err)
	}
	if p := ta.ptr(i32, kernels.F32, "weights"); p != 0 || ta.err == nil || !strings.Contains(ta.err.Error(), "weights") {
		t.Fatalf("wrong dtype: %#x, err %v", p, ta.err)
	}
	first := ta.err
	if p := ta.ptr(nil, kernels.F32, "out"); p != 0 || ta.err != first {
		t.Fatalf("after an error: %#x, err %v (want the first, %v)", p, ta.err, first)
	}
}

package cuda

import (
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"
)

// weightInfo is a checked weight [N,K] with its kernel suffix and scales.
type weightInfo struct {
	ptr, scale   uintptr
	n, k         int
	suffix       string // f32, bf16, fp8
	mode         int32  // SCALE_*
	sb0, sb1     int32
	vec          int32 // the 8-wide vector path applies
	dtype        kernels.DType
	layout       kernels.ScaleLayout
	scaleEntries int
}

func weightOf(w *kernels.Tensor, what string) (weightInfo, error) {
	var wi weightInfo
	bf, err := devBuf(w, what)
	if err != nil {
		return wi, err
	}
	if len(w.Shape) != 2 {
		return wi, fmt.Errorf("cuda: %s must be 2-D, got %v", what, w.Shape)
	}
	wi.ptr, wi.n, wi.k, wi.dtype = bf.ptr, w.Shape[0], w.Shape[1], w.DType
	wi.vec = 0
	if wi.k%8 == 0 {
		wi.vec = 1
	}
	switch w.DType {
	case kernels.F32:
		wi.suffix = "f32"
	case kernels.BF16:
		wi.suffix = "bf16"
	case kernels.F8E4M3:
		wi.suffix = "fp8"
		if w.Scale == nil {
			return wi, fmt.Errorf("cuda: f8e4m3 %s %v without a scale", what, w.Shape)
		}
		if wi.scale, err = ptrOf(w.Scale, kernels.F32, what+" scale"); err != nil {
			return wi, err
		}
		wi.layout = w.ScaleLayout
		wi.scaleEntries = w.Scale.Elements()
		switch w.ScaleLayout {
		case kernels.ScalePerChannel:
			wi.mode = 1
			if wi.scaleEntries != wi.n {
				return wi, fmt.Errorf("cuda: per-channel scale of %s has %d entries for %d rows", what, wi.scaleEntries, wi.n)
			}
		case kernels.ScaleBlock:
			wi.mode = 2
			b0, b1 := w.ScaleBlock[0], w.ScaleBlock[1]
			if b0 <= 0 || b1 <= 0 {
				return wi, fmt.Errorf("cuda: bad scale block %v for %s", w.ScaleBlock, what)
			}
			wi.sb0, wi.sb1 = int32(b0), int32(b1)
			if want := ((wi.n + b0 - 1) / b0) * ((wi.k + b1 - 1) / b1); wi.scaleEntries != want {
				return wi, fmt.Errorf("cuda: block scale of %s has %d entries, want %d", what, wi.scaleEntries, want)
			}
			if b1%8 != 0 {
				wi.vec = 0
			}
		default:
			return wi, fmt.Errorf("cuda: f8e4m3 %s without a scale layout", what)
		}
	default:
		return wi, fmt.Errorf("cuda: %s has unsupported weight dtype %v", what, w.DType)
	}
	return wi, nil
}

func (b *Backend) Linear(out, x, w, bias *kernels.Tensor) error {
	var ta tensorArgs
	xp := ta.ptr(x, kernels.F32, "linear input")
	op := ta.ptr(out, kernels.F32, "linear output")
	bp := ta.opt(bias, "linear bias")
	if ta.err != nil {
		return ta.err
	}
	wi, err := weightOf(w, "linear weight")
	if err != nil {
		return err
	}
	T, K := x.Rows(), x.Cols()
	if K != wi.k || out.Cols() != wi.n || out.Rows() != T {
		return fmt.Errorf("cuda: linear shapes: x %v, w [%d,%d], out %v", x.Shape, wi.n, wi.k, out.Shape)
	}
	if bias != nil && bias.Elements() != wi.n {
		return fmt.Errorf("cuda: linear bias has %d entries for %d outputs", bias.Elements(), wi.n)
	}
	return b.op(func() error {
		// Narrow batches stay on the tensor-core GEMV (one pass over the weights).
		if !b.sgLinearTakes(wi, T) && (T > mmaMaxTokens || !b.mmaOK(wi)) {
			if T > b.opt.GemvMaxTokens && b.blas != nil && wi.dtype != kernels.F32 {
				return b.linearCublas(op, xp, bp, wi, T)
			}
		}
		return b.linearGemv(op, xp, bp, wi, T)
	})
}

// linearGemv: each warp computes 1 or 4 consecutive rows; few rows get one
// row per warp so that small projections still spread over the GPU.
func (b *Backend) linearGemv(op, xp, bp uintptr, wi weightInfo, T int) error {
	if b.sgLinearTakes(wi, T) {
		return b.sgLinear(op, xp, bp, wi, T)
	}
	if b.mmaOK(wi) && T <= mmaMaxTokens {
		kernel := fmt.Sprintf("linear_mma_%s_n%d", wi.suffix, min(2, (T+7)/8))
		grid, err := b.residentBlocks("ops", kernel)
		if err != nil {
			return err
		}
		xs, err := b.pool.alloc(uintptr(4*T*wi.k) + 256)
		if err != nil {
			return err
		}
		defer b.pool.put(xs)
		n := int64(T * wi.k)
		sc, err := b.splitPlanes(xs.ptr, xp, n, wi.dtype == kernels.F8E4M3)
		if err != nil {
			return err
		}
		return b.launch("ops", kernel, rows(min(grid, (wi.n+15)/16)), b256, 0, op, xs.ptr, sc, wi.ptr, wi.scale, wi.mode, wi.sb0, wi.sb1, bp,
			int32(T), int32(wi.n), int32(wi.k))
	}
	const warps = 8
	r := 4
	if wi.n < 64*b.sms {
		r = 1
	}
	blocks := (wi.n + warps*r - 1) / (warps * r)
	kernel := fmt.Sprintf("linear_%s_r%d_t%d", wi.suffix, r, tokensPerPass(T))
	return b.launch("ops", kernel, rows(blocks), b256, 0, op, xp, wi.ptr, wi.scale, wi.mode, wi.sb0, wi.sb1, bp,
		int32(T), int32(wi.n), int32(wi.k), wi.vec)
}

// splitPlanes writes x (n f32) at dst as two bf16 planes, hi and lo (the
// tensor-core GEMVs' activations). It returns the planes' scale pointer,
// always 0 (= 1) for bf16 planes; the kernels keep the parameter so that a
// scaled f16 format can return without changing their signatures.
func (b *Backend) splitPlanes(dst, x uintptr, n int64, _ bool) (uintptr, error) {
	return 0, b.launch("ops", "split_planes", grid1(n, 1024), b256, 0, dst, x, n)
}

// mmaMaxTokens is the widest batch the tensor-core GEMV takes; wider ones go
// to cuBLAS, which measured faster at 64 tokens (H200, 2026-11-27).
const mmaMaxTokens = 16

// mmaOK says whether the tensor-core GEMV takes w: bf16 or e4m3 with K a
// multiple of 32 (and block scales that do not split a 32-wide strip).
func (b *Backend) mmaOK(wi weightInfo) bool {
	if b.opt.NoTensorCoreGemv || wi.k%32 != 0 || (wi.dtype != kernels.BF16 && wi.dtype != kernels.F8E4M3) {
		return false
	}
	return wi.mode != 2 || wi.sb1%32 == 0
}

// tokensPerPass picks the GEMV kernels' token chunk: few accumulators for
// narrow batches keep registers low and occupancy high.
func tokensPerPass(avg int) int {
	switch {
	case avg <= 1:
		return 1
	case avg <= 2:
		return 2
	case avg <= 4:
		return 4
	}
	return 8
}

// linearCublas runs a cuBLAS GEMM with f32 accumulation on bf16 operands
// (an FP8 weight is first expanded to a bf16 copy). By default x is split
// into two bf16 halves (hi + lo) stacked as 2T rows, so the result keeps
// about f32 accuracy at twice the FLOPs; Options.FastWideGemm rounds x to
// bf16 once instead, as bf16 serving stacks do.
func (b *Backend) linearCublas(op, xp, bp uintptr, wi weightInfo, T int) error {
	split := !b.opt.FastWideGemm
	rowsX := T
	if split {
		rowsX = 2 * T
	}
	xb, err := b.pool.alloc(uintptr(2 * rowsX * wi.k))
	if err != nil {
		return err
	}
	defer b.pool.put(xb)
	n := int64(T * wi.k)
	conv := "f32_to_bf16"
	if split {
		conv = "f32_to_bf16_split"
	}
	if err := b.launch("ops", conv, grid1(n, 1024), b256, 0, xb.ptr, xp, n); err != nil {
		return err
	}
	// FP8 weights are expanded to bf16: per-channel scales stay out (the
	// copy holds e4m3 exactly, finish_gemm scales the columns); block scales
	// are multiplied in, and unless FastWideGemm the rounding remainder goes
	// to a second copy (wlo) that one more GEMM adds, so that scaled weights
	// keep ~16 bits as on the CPU.
	wptr, wlo := wi.ptr, uintptr(0)
	if wi.dtype == kernels.F8E4M3 {
		halvesW := 1
		if split && wi.mode == 2 {
			halvesW = 2
		}
		wb, err := b.pool.alloc(uintptr(2 * halvesW * wi.n * wi.k))
		if err != nil {
			return err
		}
		defer b.pool.put(wb)
		for h := range halvesW {
			if err := b.dequantFP8(wb.ptr+uintptr(2*h*wi.n*wi.k), wi, h == 1); err != nil {
				return err
			}
		}
		wptr = wb.ptr
		if halvesW == 2 {
			wlo = wb.ptr + uintptr(2*wi.n*wi.k)
		}
	}
	var colScale uintptr
	if wi.dtype == kernels.F8E4M3 && wi.mode == 1 {
		colScale = wi.scale
	}
	halves := int32(0)
	c := op
	if split {
		halves = 1
		cb, err := b.pool.alloc(uintptr(4 * 2 * T * wi.n))
		if err != nil {
			return err
		}
		defer b.pool.put(cb)
		c = cb.ptr
	}
	if err := b.blas.gemmBF16(c, xb.ptr, wptr, rowsX, wi.n, wi.k); err != nil {
		return err
	}
	if wlo != 0 {
		if err := b.blas.gemmBF16Beta(c, xb.ptr, wlo, rowsX, wi.n, wi.k, 1); err != nil {
			return err
		}
	}
	if !split && colScale == 0 && bp == 0 {
		return nil
	}
	grid := [3]uint32{uint32((wi.n + 1023) / 1024), uint32(min(T, 65535)), 1}
	return b.launch("ops", "finish_gemm", grid, b256, 0, op, c, halves, colScale, bp, int32(T), int32(wi.n))
}

// dequantFP8 writes the bf16 copy of e4m3 weight w at out (src/ops.cu
// dequant_fp8): block scales multiplied in, per-channel scales left out;
// lo writes the rounding remainders instead.
func (b *Backend) dequantFP8(out uintptr, w weightInfo, lo bool) error {
	sb0, sb1 := w.sb0, w.sb1
	if sb1 == 0 {
		sb0, sb1 = 1, 1
	}
	vec := w.k%16 == 0 && w.ptr%16 == 0 && out%32 == 0 && (w.mode != 2 || sb1%16 == 0)
	grid := [3]uint32{uint32(w.n), uint32((w.k + 16*256 - 1) / (16 * 256)), 1}
	return b.launch("ops", "dequant_fp8", grid, b256, 0, out, w.ptr, w.scale, w.mode, sb0, sb1,
		int32(w.n), int32(w.k), int32(0), boolArg(lo), boolArg(vec))
}

func boolArg(v bool) int32 {
	if v {
		return 1
	}
	return 0
}

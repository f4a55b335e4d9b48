package cuda

import (
	"fmt"
	"unsafe"

	"github.com/ebitengine/purego"
)

// cublas is the subset of cuBLAS used for the large GEMMs of prefill and
// wide batches (bf16 inputs, f32 output and accumulation).
type cublas struct {
	handle uintptr

	cublasCreate       func(h *uintptr) int32
	cublasDestroy      func(h uintptr) int32
	cublasSetStream    func(h uintptr, s uintptr) int32
	cublasSetWorkspace func(h uintptr, ws uintptr, n uintptr) int32
	cublasGemmEx       func(h uintptr, ta, tb int32, m, n, k int32, alpha unsafe.Pointer,
		a uintptr, at int32, lda int32, b uintptr, bt int32, ldb int32, beta unsafe.Pointer,
		c uintptr, ct int32, ldc int32, compute int32, algo int32) int32
	cublasGemmBatchedEx func(h uintptr, ta, tb int32, m, n, k int32, alpha unsafe.Pointer,
		a uintptr, at int32, lda int32, b uintptr, bt int32, ldb int32, beta unsafe.Pointer,
		c uintptr, ct int32, ldc int32, batch int32, compute int32, algo int32) int32
}

// cuBLAS / CUDA enum values (cublas_api.h, library_types.h).
const (
	cudaR32F         = 0
	cudaR16BF        = 14
	cublasCompute32F = 68
	cublasOpN        = 0
	cublasOpT        = 1
	cublasGemmDflt   = -1
)

func openCublas(stream, workspace uintptr, wsBytes uintptr) (*cublas, error) {
	// cublasLt first: libcublas needs it and finds it by soname once loaded.
	if _, _, err := openLib("cuBLASLt (libcublasLt.so)", "libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"); err != nil {
		return nil, err
	}
	lib, name, err := openLib("cuBLAS (libcublas.so)", "libcublas.so.13", "libcublas.so.12", "libcublas.so")
	if err != nil {
		return nil, err
	}
	c := &cublas{}
	fns := []struct {
		fptr any
		name string
	}{
		{&c.cublasCreate, "cublasCreate_v2"}, {&c.cublasDestroy, "cublasDestroy_v2"},
		{&c.cublasSetStream, "cublasSetStream_v2"}, {&c.cublasSetWorkspace, "cublasSetWorkspace_v2"},
		{&c.cublasGemmEx, "cublasGemmEx"}, {&c.cublasGemmBatchedEx, "cublasGemmBatchedEx"},
	}
	for _, f := range fns {
		p, err := sym(lib, name, f.name)
		if err != nil {
			return nil, err
		}
		purego.RegisterFunc(f.fptr, p)
	}
	if r := c.cublasCreate(&c.handle); r != 0 {
		return nil, fmt.Errorf("cublas: create: status %d", r)
	}
	if r := c.cublasSetStream(c.handle, stream); r != 0 {
		return nil, fmt.Errorf("cublas: set stream: status %d", r)
	}
	// A fixed workspace keeps cuBLAS from allocating, which graph capture forbids.
	if r := c.cublasSetWorkspace(c.handle, workspace, wsBytes); r != 0 {
		return nil, fmt.Errorf("cublas: set workspace: status %d", r)
	}
	return c, nil
}

// gemmBF16 computes out[T,N] (f32, row-major) = x[T,K] · w[N,K]ᵀ with bf16 x and w.
func (c *cublas) gemmBF16(out, x, w uintptr, T, N, K int) error {
	return c.gemmBF16Beta(out, x, w, T, N, K, 0)
}

// gemmBF16Beta is gemmBF16 adding beta·out (beta 1: accumulate).
func (c *cublas) gemmBF16Beta(out, x, w uintptr, T, N, K int, b float32) error {
	alpha, beta := new(float32), new(float32)
	*alpha, *beta = 1, b
	r := c.cublasGemmEx(c.handle, cublasOpT, cublasOpN, int32(N), int32(T), int32(K),
		unsafe.Pointer(alpha), w, cudaR16BF, int32(K), x, cudaR16BF, int32(K),
		unsafe.Pointer(beta), out, cudaR32F, int32(N), cublasCompute32F, cublasGemmDflt)
	if r != 0 {
		return fmt.Errorf("cublas: gemm %dx%dx%d: status %d", T, N, K, r)
	}
	return nil
}

// gemmBF16Batched is gemmBF16 over count independent problems of the same
// shape: outs, xs and ws are device arrays of count pointers each; beta 1
// accumulates into the outputs.
func (c *cublas) gemmBF16Batched(outs, xs, ws uintptr, T, N, K, count int, b float32) error {
	alpha, beta := new(float32), new(float32)
	*alpha, *beta = 1, b
	r := c.cublasGemmBatchedEx(c.handle, cublasOpT, cublasOpN, int32(N), int32(T), int32(K),
		unsafe.Pointer(alpha), ws, cudaR16BF, int32(K), xs, cudaR16BF, int32(K),
		unsafe.Pointer(beta), outs, cudaR32F, int32(N), int32(count), cublasCompute32F, cublasGemmDflt)
	if r != 0 {
		return fmt.Errorf("cublas: batched gemm %d×(%dx%dx%d): status %d", count, T, N, K, r)
	}
	return nil
}

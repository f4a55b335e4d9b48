// Package cudatest opens CUDA backends for tests outside package cuda: the
// test is skipped where there is no CUDA (no driver, no NVRTC, no device),
// fails on any other error, and the backend closes when the test ends.
package cudatest

import (
	"errors"
	"testing"

	"github.com/glmtopo/glmtopo/kernels/cuda"
)

// Open opens a backend with opt, or skips the test without CUDA.
func Open(t testing.TB, opt cuda.Options) *cuda.Backend {
	t.Helper()
	b, err := cuda.New(opt)
	if errors.Is(err, cuda.ErrNoCUDA) {
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

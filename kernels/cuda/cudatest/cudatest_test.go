package cudatest

import (
	"testing"

	"github.com/glmtopo/glmtopo/kernels/cuda"
)

// TestOpen: a backend where there is a GPU; here and in CI, a skip (not a
// failure) that says CUDA is missing.
func TestOpen(t *testing.T) {
	b := Open(t, cuda.Options{})
	if b.SMs() <= 0 {
		t.Fatalf("device %s reports %d SMs", b.DeviceName(), b.SMs())
	}
}

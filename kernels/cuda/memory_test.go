package cuda

import (
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
)

// A view aliases its base and is never freed by Free.
func TestViewOnGPU(t *testing.T) {
	b := gpu(t, Options{})
	base, err := b.NewTensor(kernels.F32, 1024)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Free(base)
	v, err := b.View(base, 1024, kernels.F32, 16)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Upload(v, make([]byte, 64)); err != nil {
		t.Fatal(err)
	}
	live := b.MemoryStats().Live
	b.Free(v)
	if b.MemoryStats().Live != live {
		t.Error("freeing a view returned memory to the pool")
	}
	if _, err := b.View(base, 4000, kernels.F32, 16); err == nil {
		t.Error("a view past its base's end was allowed")
	}
}

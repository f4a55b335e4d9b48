package cuda

import (
	"bytes"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
)

// TestUploadRegistered uploads 512 MiB weights from the Go heap and from a
// read-only memory-mapped file (as checkpoints are read), page-locked for the
// copy and, for comparison, pageable; every copy must come back intact. It
// logs the rates (weights load at what the host link gives).
func TestUploadRegistered(t *testing.T) {
	gpu(t, Options{}) // skips without CUDA before the 512 MiB below are made
	const n = 512 << 20
	src := make([]byte, n)
	for i := range src {
		src[i] = byte(i*7 + i>>13)
	}
	path := filepath.Join(t.TempDir(), "weights.bin")
	if err := os.WriteFile(path, src, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	mapped, err := syscall.Mmap(int(f.Fd()), 0, n, syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		t.Skipf("mmap: %v", err)
	}
	defer syscall.Munmap(mapped)
	var sum byte
	for i := 0; i < n; i += 4096 { // fault the mapping in, so no case pays for it
		sum += mapped[i]
	}
	_ = sum
	for _, c := range []struct {
		name     string
		pageable bool
		data     []byte
	}{{"heap/registered", false, src}, {"heap/pageable", true, src}, {"mmap/registered", false, mapped}, {"mmap/pageable", true, mapped}} {
		t.Run(c.name, func(t *testing.T) {
			b := gpu(t, Options{PageableUploads: c.pageable})
			start := time.Now()
			w, err := b.UploadWeight(kernels.I32, []int{n / 4}, c.data)
			if err != nil {
				t.Fatal(err)
			}
			if err := b.Sync(); err != nil {
				t.Fatal(err)
			}
			el := time.Since(start)
			got, err := b.DownloadI32(w)
			if err != nil {
				t.Fatal(err)
			}
			back := make([]byte, 0, n)
			for _, v := range got {
				back = append(back, byte(v), byte(v>>8), byte(v>>16), byte(v>>24))
			}
			if !bytes.Equal(back, src) {
				t.Fatal("uploaded weight differs from its source")
			}
			t.Logf("%s: %.1f GB/s (%v for %d MiB)", c.name, float64(n)/el.Seconds()/1e9, el, n>>20)
		})
	}
}

//go:build !(linux || darwin || freebsd || netbsd || openbsd)

package safetensors

import (
	"fmt"
	"io"
	"os"
)

// mapFile reads the whole file where mmap is not available.
func mapFile(f *os.File, size int64) ([]byte, error) {
	b := make([]byte, size)
	if _, err := io.ReadFull(io.NewSectionReader(f, 0, size), b); err != nil {
		return nil, fmt.Errorf("read: %w", err)
	}
	return b, nil
}

func unmapFile([]byte) error { return nil }

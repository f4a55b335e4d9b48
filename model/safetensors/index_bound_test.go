package safetensors

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A huge index file is refused without being read into memory.
func TestOpenDirRefusesHugeIndex(t *testing.T) {
	dir := t.TempDir()
	f, err := os.Create(filepath.Join(dir, "model.safetensors.index.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(4 << 30); err != nil { // sparse
		t.Fatal(err)
	}
	f.Close()
	if _, err := OpenDir(dir); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("err %v, want a size refusal", err)
	}
}

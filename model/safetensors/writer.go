package safetensors

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
)

// Writer streams a safetensors file: the header is written first, with
// offsets computed from the declared shapes, and each tensor's bytes are
// then written straight to its place in the file, in any order, so a large
// shard never sits in memory. The file is written under a temporary name
// and renamed into place by a successful Close. A Writer is not safe for
// concurrent use.
type Writer struct {
	path    string
	tmp     *os.File
	entries map[string]*writerEntry
	order   []string // data order
	err     error    // sticky
	closed  bool
}

type writerEntry struct {
	info      TensorInfo
	off, size int64 // absolute file offset and byte size
	written   bool
}

// NewWriter creates path (replacing it on Close) for the given tensors and
// __metadata__ (nil or empty for none). Tensors are laid out like the
// reference implementation does: by dtype size, largest first, then by name,
// so every tensor is aligned to its element size (the header is padded with
// spaces to a multiple of 8). TensorInfo.File is ignored.
func NewWriter(path string, tensors []TensorInfo, metadata map[string]string) (*Writer, error) {
	w := &Writer{path: path, entries: make(map[string]*writerEntry, len(tensors))}
	for _, ti := range tensors {
		switch {
		case ti.Name == "" || ti.Name == metadataKey:
			return nil, fmt.Errorf("safetensors write %s: invalid tensor name %q", path, ti.Name)
		case !ti.DType.Valid():
			return nil, fmt.Errorf("safetensors write %s: tensor %q: unknown dtype %q", path, ti.Name, ti.DType)
		case ti.ByteSize() < 0:
			return nil, fmt.Errorf("safetensors write %s: tensor %q: invalid shape %v", path, ti.Name, ti.Shape)
		}
		if _, dup := w.entries[ti.Name]; dup {
			return nil, fmt.Errorf("safetensors write %s: tensor %q declared twice", path, ti.Name)
		}
		shape := append([]int64{}, ti.Shape...)
		w.entries[ti.Name] = &writerEntry{info: TensorInfo{Name: ti.Name, DType: ti.DType, Shape: shape}, size: ti.ByteSize()}
		w.order = append(w.order, ti.Name)
	}
	sort.Slice(w.order, func(i, j int) bool {
		a, b := w.entries[w.order[i]].info, w.entries[w.order[j]].info
		if a.DType.Size() != b.DType.Size() {
			return a.DType.Size() > b.DType.Size()
		}
		return a.Name < b.Name
	})

	hdr := make(map[string]any, len(tensors)+1)
	if len(metadata) > 0 {
		hdr[metadataKey] = metadata
	}
	var pos int64
	for _, n := range w.order {
		e := w.entries[n]
		hdr[n] = struct {
			DType       DType    `json:"dtype"`
			Shape       []int64  `json:"shape"`
			DataOffsets [2]int64 `json:"data_offsets"`
		}{e.info.DType, e.info.Shape, [2]int64{pos, pos + e.size}}
		e.off = pos
		pos += e.size
	}
	js, err := json.Marshal(hdr) // map keys come out sorted
	if err != nil {
		return nil, fmt.Errorf("safetensors write %s: header: %w", path, err)
	}
	for len(js)%8 != 0 {
		js = append(js, ' ')
	}
	dataStart := int64(8 + len(js))
	for _, e := range w.entries {
		e.off += dataStart
	}

	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return nil, fmt.Errorf("safetensors write: %w", err)
	}
	w.tmp = tmp
	buf := make([]byte, 8, dataStart)
	binary.LittleEndian.PutUint64(buf, uint64(len(js)))
	buf = append(buf, js...)
	if _, err := tmp.Write(buf); err != nil {
		w.abort()
		return nil, fmt.Errorf("safetensors write %s: %w", path, err)
	}
	// Size the file now so tensors can be written at their offsets in any order.
	if err := tmp.Truncate(dataStart + pos); err != nil {
		w.abort()
		return nil, fmt.Errorf("safetensors write %s: %w", path, err)
	}
	return w, nil
}

// Order is the order of the tensors' bytes in the file; writing in this
// order writes the file sequentially.
func (w *Writer) Order() []string { return append([]string(nil), w.order...) }

// Write writes the named tensor's bytes, which must be exactly its size.
func (w *Writer) Write(name string, data []byte) error {
	return w.WriteTensor(name, func(dst io.Writer) error {
		_, err := dst.Write(data)
		return err
	})
}

// WriteTensor streams the named tensor's bytes: fill must write exactly the
// tensor's byte size to dst (buffered; writing more fails at once).
func (w *Writer) WriteTensor(name string, fill func(dst io.Writer) error) error {
	if w.closed {
		return fmt.Errorf("safetensors write %s: tensor %q: writer is closed", w.path, name)
	}
	if w.err != nil {
		return w.err
	}
	e, ok := w.entries[name]
	switch {
	case !ok:
		return fmt.Errorf("safetensors write %s: tensor %q was not declared: %w", w.path, name, ErrNotFound)
	case e.written:
		return fmt.Errorf("safetensors write %s: tensor %q written twice", w.path, name)
	}
	lw := &limitedWriter{w: io.NewOffsetWriter(w.tmp, e.off), left: e.size}
	bw := bufio.NewWriterSize(lw, 1<<20)
	err := fill(bw)
	if err == nil {
		err = bw.Flush()
	}
	if err == nil && lw.left != 0 {
		err = fmt.Errorf("wrote %d of %d bytes", e.size-lw.left, e.size)
	}
	if err != nil {
		// The file may hold part of this tensor; fail the whole file.
		w.err = fmt.Errorf("safetensors write %s: tensor %q (%s%v): %w", w.path, name, e.info.DType, e.info.Shape, err)
		return w.err
	}
	e.written = true
	return nil
}

type limitedWriter struct {
	w    io.Writer
	left int64
}

func (l *limitedWriter) Write(p []byte) (int, error) {
	if int64(len(p)) > l.left {
		return 0, fmt.Errorf("more bytes than the tensor's size (%d too many)", int64(len(p))-l.left)
	}
	n, err := l.w.Write(p)
	l.left -= int64(n)
	return n, err
}

// Close checks that every declared tensor was written, syncs the file and
// renames it into place. On any error the partial file is removed.
func (w *Writer) Close() error {
	if w.closed {
		return nil
	}
	w.closed = true
	if w.err != nil {
		w.abort()
		return w.err
	}
	var missing []string
	for _, n := range w.order {
		if !w.entries[n].written {
			missing = append(missing, n)
		}
	}
	if len(missing) > 0 {
		w.abort()
		return fmt.Errorf("safetensors write %s: %d tensors never written, first %q", w.path, len(missing), missing[0])
	}
	err := w.tmp.Chmod(0o644) // CreateTemp makes it 0600
	if err == nil {
		err = w.tmp.Sync()
	}
	if cerr := w.tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(w.tmp.Name(), w.path)
	}
	if err != nil {
		os.Remove(w.tmp.Name())
		return fmt.Errorf("safetensors write %s: %w", w.path, err)
	}
	return nil
}

// Abort discards the file being written; Close after Abort does nothing.
func (w *Writer) Abort() {
	if !w.closed {
		w.closed = true
		w.abort()
	}
}

func (w *Writer) abort() {
	w.tmp.Close()
	os.Remove(w.tmp.Name())
}

// WriteIndex writes dir/model.safetensors.index.json mapping each tensor name
// to its shard file name, with metadata.total_size (the sum of the tensors'
// byte sizes, as Hugging Face writes it).
func WriteIndex(dir string, weightMap map[string]string, totalSize int64) error {
	if len(weightMap) == 0 {
		return errors.New("safetensors write index: empty weight map")
	}
	for name, shard := range weightMap {
		if !filepath.IsLocal(shard) {
			return fmt.Errorf("safetensors write index: tensor %q maps to %q, not a file inside %s", name, shard, dir)
		}
	}
	js, err := json.MarshalIndent(struct {
		Metadata  map[string]int64  `json:"metadata"`
		WeightMap map[string]string `json:"weight_map"`
	}{map[string]int64{"total_size": totalSize}, weightMap}, "", "  ")
	if err != nil {
		return fmt.Errorf("safetensors write index: %w", err)
	}
	path := filepath.Join(dir, IndexFile)
	if err := os.WriteFile(path, append(js, '\n'), 0o644); err != nil {
		return fmt.Errorf("safetensors write index: %w", err)
	}
	return nil
}

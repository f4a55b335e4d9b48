package safetensors

import (
	"fmt"
	"os"
	"slices"
	"sync"
)

// File is one safetensors file. Its header is read and validated when it is
// opened; the tensor bytes are memory-mapped read-only, at Open for a File
// and on first use for a shard of a Checkpoint. A File is safe for
// concurrent use.
type File struct {
	path  string // as given; labels errors
	label string // TensorInfo.File of its tensors
	size  int64
	hdr   *header

	mu     sync.Mutex
	data   []byte // the whole file once mapped
	mapped bool
	closed bool
}

// Open reads, validates and maps one .safetensors file.
func Open(path string) (*File, error) {
	f, err := openHeader(path, path)
	if err != nil {
		return nil, err
	}
	if _, err := f.mapping(); err != nil {
		return nil, err
	}
	return f, nil
}

// openHeader reads and validates the header of path without mapping it.
func openHeader(path, label string) (*File, error) {
	osf, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	defer osf.Close()
	st, err := osf.Stat()
	if err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("safetensors %s: not a regular file", path)
	}
	hdr, err := readHeader(path, osf, st.Size())
	if err != nil {
		return nil, err
	}
	for _, e := range hdr.tensors {
		e.info.File = label
	}
	return &File{path: path, label: label, size: st.Size(), hdr: hdr}, nil
}

// mapping maps the file on first use and returns the mapping.
func (f *File) mapping() ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil, fmt.Errorf("safetensors %s: file is closed", f.path)
	}
	if f.mapped {
		return f.data, nil
	}
	osf, err := os.Open(f.path)
	if err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	defer osf.Close()
	st, err := osf.Stat()
	if err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	if st.Size() != f.size {
		return nil, fmt.Errorf("safetensors %s: file changed size from %d to %d bytes since its header was read", f.path, f.size, st.Size())
	}
	data, err := mapFile(osf, f.size)
	if err != nil {
		return nil, fmt.Errorf("safetensors %s: %w", f.path, err)
	}
	f.data, f.mapped = data, true
	return data, nil
}

// Path is the path the file was opened with.
func (f *File) Path() string { return f.path }

// Metadata is the header's __metadata__ map (nil when absent). Do not modify it.
func (f *File) Metadata() map[string]string { return f.hdr.metadata }

// Names lists the tensor names in sorted order.
func (f *File) Names() []string { return append([]string(nil), f.hdr.names...) }

// Info describes the named tensor without touching its data.
func (f *File) Info(name string) (TensorInfo, bool) {
	e, ok := f.hdr.tensors[name]
	if !ok {
		return TensorInfo{}, false
	}
	return e.info, true
}

// Tensor returns a zero-copy view of the named tensor. Its Data aliases the
// mapping and must not be used after Close.
func (f *File) Tensor(name string) (Tensor, error) {
	e, ok := f.hdr.tensors[name]
	if !ok {
		return Tensor{}, fmt.Errorf("safetensors %s: tensor %q: %w", f.path, name, ErrNotFound)
	}
	data, err := f.mapping()
	if err != nil {
		return Tensor{}, fmt.Errorf("tensor %q: %w", name, err)
	}
	start, end := f.hdr.dataStart+e.begin, f.hdr.dataStart+e.end
	return Tensor{TensorInfo: e.info, Data: data[start:end:end]}, nil
}

// TensorAs is Tensor that also requires the dtype and shape; dtype "" accepts
// any dtype. The error names the file, the tensor, and what was wanted and found.
func (f *File) TensorAs(name string, dtype DType, shape ...int64) (Tensor, error) {
	e, ok := f.hdr.tensors[name]
	if !ok {
		return Tensor{}, fmt.Errorf("safetensors %s: tensor %q: %w", f.path, name, ErrNotFound)
	}
	if err := expect(f.path, e.info, dtype, shape); err != nil {
		return Tensor{}, err
	}
	return f.Tensor(name)
}

func expect(path string, got TensorInfo, dtype DType, shape []int64) error {
	if (dtype != "" && got.DType != dtype) || !slices.Equal(got.Shape, shape) {
		want := dtype
		if want == "" {
			want = "any"
		}
		return fmt.Errorf("safetensors %s: tensor %q is %s%v, want %s%v", path, got.Name, got.DType, got.Shape, want, shape)
	}
	return nil
}

// Close unmaps the file. Tensor data obtained from it must not be used after.
func (f *File) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil
	}
	f.closed = true
	data := f.data
	f.data, f.mapped = nil, false
	if err := unmapFile(data); err != nil {
		return fmt.Errorf("safetensors %s: munmap: %w", f.path, err)
	}
	return nil
}

// isMapped reports whether the data is currently mapped (for tests and
// Checkpoint.MappedFiles).
func (f *File) isMapped() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.mapped
}

package safetensors

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
)

// IndexFile is the name of the shard index in a sharded checkpoint.
const IndexFile = "model.safetensors.index.json"

// Checkpoint is a set of safetensors files read as one: a sharded checkpoint
// described by model.safetensors.index.json, a single model.safetensors, or
// every *.safetensors file in a directory. Every shard's header is read and
// validated at open; a shard is mapped only when one of its tensors is first
// requested, so a stage that needs a few tensors maps only the shards holding
// them. A Checkpoint is safe for concurrent use.
type Checkpoint struct {
	dir    string
	files  []*File          // sorted by label
	byName map[string]*File // tensor name → the file holding it
	names  []string         // sorted
}

type indexJSON struct {
	Metadata  map[string]any    `json:"metadata"`
	WeightMap map[string]string `json:"weight_map"`
}

// OpenDir opens the checkpoint in dir: through model.safetensors.index.json
// if present (tensors a shard holds but the index does not list are ignored,
// as Hugging Face loaders do), else model.safetensors, else all
// *.safetensors files (a tensor in two of them is an error). A path to a
// single .safetensors file opens that file alone.
func OpenDir(dir string) (*Checkpoint, error) {
	st, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("safetensors: open checkpoint: %w", err)
	}
	if st.Mode().IsRegular() {
		return openFiles(filepath.Dir(dir), []string{filepath.Base(dir)})
	}
	indexPath := filepath.Join(dir, IndexFile)
	switch _, err := os.Stat(indexPath); {
	case err == nil:
		return openIndex(dir, indexPath)
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "model.safetensors")); err == nil {
		return openFiles(dir, []string{"model.safetensors"})
	}
	matches, err := filepath.Glob(filepath.Join(dir, "*.safetensors"))
	if err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	if len(matches) == 0 {
		return nil, fmt.Errorf("safetensors: no %s and no *.safetensors files in %s", IndexFile, dir)
	}
	for i, m := range matches {
		matches[i] = filepath.Base(m)
	}
	return openFiles(dir, matches)
}

// maxIndexBytes bounds model.safetensors.index.json (GLM-4.5-FP8's is ~7 MB).
const maxIndexBytes = 64 << 20

func openIndex(dir, indexPath string) (*Checkpoint, error) {
	f, err := os.Open(indexPath)
	if err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	raw, err := io.ReadAll(io.LimitReader(f, maxIndexBytes+1))
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	if len(raw) > maxIndexBytes {
		return nil, fmt.Errorf("safetensors %s: larger than %d bytes: not a checkpoint index", indexPath, maxIndexBytes)
	}
	var idx indexJSON
	if err := json.Unmarshal(raw, &idx); err != nil {
		return nil, fmt.Errorf("safetensors %s: malformed index JSON: %w", indexPath, err)
	}
	if len(idx.WeightMap) == 0 {
		return nil, fmt.Errorf("safetensors %s: index has no weight_map entries", indexPath)
	}
	// One tensor per shard, for error messages; shard names are validated
	// before any is opened.
	example := make(map[string]string)
	for name, shard := range idx.WeightMap {
		if !filepath.IsLocal(shard) {
			return nil, fmt.Errorf("safetensors %s: tensor %q maps to shard %q outside the checkpoint directory", indexPath, name, shard)
		}
		if ex, ok := example[shard]; !ok || name < ex {
			example[shard] = name
		}
	}
	c := &Checkpoint{dir: dir, byName: make(map[string]*File, len(idx.WeightMap))}
	byShard := make(map[string]*File, len(example))
	for _, shard := range sortedKeys(example) {
		f, err := openHeader(filepath.Join(dir, shard), shard)
		if err != nil {
			c.Close()
			if errors.Is(err, fs.ErrNotExist) {
				return nil, fmt.Errorf("safetensors %s: shard %s (holding %q and maybe more) is missing: %w", indexPath, shard, example[shard], err)
			}
			return nil, err
		}
		byShard[shard] = f
		c.files = append(c.files, f)
	}
	for name, shard := range idx.WeightMap {
		f := byShard[shard]
		if _, ok := f.hdr.tensors[name]; !ok {
			c.Close()
			return nil, fmt.Errorf("safetensors %s: index maps tensor %q to %s, which does not contain it: %w", indexPath, name, shard, ErrNotFound)
		}
		c.byName[name] = f
	}
	c.names = sortedKeys(c.byName)
	return c, nil
}

func openFiles(dir string, labels []string) (*Checkpoint, error) {
	sort.Strings(labels)
	c := &Checkpoint{dir: dir, byName: make(map[string]*File)}
	for _, l := range labels {
		f, err := openHeader(filepath.Join(dir, l), l)
		if err != nil {
			c.Close()
			return nil, err
		}
		c.files = append(c.files, f)
		for _, name := range f.hdr.names {
			if prev, dup := c.byName[name]; dup {
				c.Close()
				return nil, fmt.Errorf("safetensors %s: tensor %q is in both %s and %s", dir, name, prev.label, l)
			}
			c.byName[name] = f
		}
	}
	c.names = sortedKeys(c.byName)
	return c, nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// Dir is the checkpoint directory.
func (c *Checkpoint) Dir() string { return c.dir }

// Names lists every tensor name in sorted order.
func (c *Checkpoint) Names() []string { return append([]string(nil), c.names...) }

// Files lists the checkpoint's files (shards), sorted by name; each is
// mapped only once a tensor is read from it.
func (c *Checkpoint) Files() []*File { return append([]*File(nil), c.files...) }

// Mapped lists the shards currently mapped, by file name.
func (c *Checkpoint) Mapped() []string {
	var out []string
	for _, f := range c.files {
		if f.isMapped() {
			out = append(out, f.label)
		}
	}
	return out
}

// Info describes the named tensor without mapping anything; Info.File is
// the shard's file name relative to Dir.
func (c *Checkpoint) Info(name string) (TensorInfo, bool) {
	f, ok := c.byName[name]
	if !ok {
		return TensorInfo{}, false
	}
	return f.Info(name)
}

// Tensor returns a zero-copy view of the named tensor, mapping its shard on
// first use. Data must not be used after Close.
func (c *Checkpoint) Tensor(name string) (Tensor, error) {
	f, ok := c.byName[name]
	if !ok {
		return Tensor{}, fmt.Errorf("safetensors %s: tensor %q: %w", c.dir, name, ErrNotFound)
	}
	return f.Tensor(name)
}

// TensorAs is Tensor that also requires the dtype ("" for any) and shape;
// the error names the file, the tensor, and what was wanted and found.
func (c *Checkpoint) TensorAs(name string, dtype DType, shape ...int64) (Tensor, error) {
	f, ok := c.byName[name]
	if !ok {
		return Tensor{}, fmt.Errorf("safetensors %s: tensor %q: %w", c.dir, name, ErrNotFound)
	}
	return f.TensorAs(name, dtype, shape...)
}

// Close unmaps every shard. Tensor data obtained from the checkpoint must
// not be used after.
func (c *Checkpoint) Close() error {
	var errs []error
	for _, f := range c.files {
		errs = append(errs, f.Close())
	}
	return errors.Join(errs...)
}

// Source is the read API File and Checkpoint share, for code that takes
// either a single file or a whole checkpoint.
type Source interface {
	Names() []string
	Info(name string) (TensorInfo, bool)
	Tensor(name string) (Tensor, error)
	TensorAs(name string, dtype DType, shape ...int64) (Tensor, error)
	Close() error
}

var (
	_ Source = (*File)(nil)
	_ Source = (*Checkpoint)(nil)
)

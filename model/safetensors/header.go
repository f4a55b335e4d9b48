package safetensors

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
)

// MaxHeaderSize bounds the JSON header, as the reference implementation does
// (100 MB); a length beyond it means a corrupt or foreign file.
const MaxHeaderSize = 100_000_000

const metadataKey = "__metadata__"

// ErrNotFound is wrapped by errors for a tensor name that is not present.
var ErrNotFound = errors.New("tensor not found")

// header is a parsed and validated safetensors header.
type header struct {
	metadata  map[string]string
	tensors   map[string]*entry
	names     []string // sorted
	dataStart int64    // 8 + header length
}

type entry struct {
	info       TensorInfo
	begin, end int64 // relative to dataStart
}

type rawEntry struct {
	DType       *string  `json:"dtype"`
	Shape       *[]int64 `json:"shape"`
	DataOffsets *[]int64 `json:"data_offsets"`
}

// readHeader reads and validates the header of a safetensors file of the
// given size through r. name labels every error.
func readHeader(name string, r io.ReaderAt, size int64) (*header, error) {
	if size < 8 {
		return nil, fmt.Errorf("safetensors %s: file is %d bytes, shorter than the 8-byte header length", name, size)
	}
	var lenBuf [8]byte
	if _, err := r.ReadAt(lenBuf[:], 0); err != nil {
		return nil, fmt.Errorf("safetensors %s: read header length: %w", name, err)
	}
	n := binary.LittleEndian.Uint64(lenBuf[:])
	if n > MaxHeaderSize {
		return nil, fmt.Errorf("safetensors %s: header length %d exceeds the %d-byte limit (corrupt or not a safetensors file)", name, n, MaxHeaderSize)
	}
	if int64(n) > size-8 {
		return nil, fmt.Errorf("safetensors %s: header length %d exceeds the file size (%d bytes after the 8-byte length; truncated file?)", name, n, size-8)
	}
	buf := make([]byte, n)
	if _, err := r.ReadAt(buf, 8); err != nil {
		return nil, fmt.Errorf("safetensors %s: read header: %w", name, err)
	}
	return parseHeader(name, buf, size)
}

// parseHeader validates the JSON header buf of a file of fileSize bytes.
func parseHeader(name string, buf []byte, fileSize int64) (*header, error) {
	fail := func(format string, args ...any) error {
		return fmt.Errorf("safetensors %s: "+format, append([]any{name}, args...)...)
	}
	if len(buf) == 0 || buf[0] != '{' {
		return nil, fail("header does not start with '{' (not a safetensors file?)")
	}
	raw, err := decodeObject(buf)
	if err != nil {
		return nil, fail("malformed header JSON: %v", err)
	}
	h := &header{
		tensors:   make(map[string]*entry, len(raw)),
		dataStart: 8 + int64(len(buf)),
	}
	for key, val := range raw {
		if key == metadataKey {
			if err := json.Unmarshal(val, &h.metadata); err != nil {
				return nil, fail("__metadata__ is not a string map: %v", err)
			}
			continue
		}
		var re rawEntry
		if err := json.Unmarshal(val, &re); err != nil {
			return nil, fail("tensor %q: malformed entry: %v", key, err)
		}
		e, err := checkEntry(key, re)
		if err != nil {
			return nil, fail("%v", err)
		}
		h.tensors[key] = e
		h.names = append(h.names, key)
	}
	sort.Strings(h.names)
	dataLen := fileSize - h.dataStart
	if err := checkOffsets(h, dataLen); err != nil {
		return nil, fail("%v", err)
	}
	return h, nil
}

func checkEntry(name string, re rawEntry) (*entry, error) {
	switch {
	case name == "":
		return nil, errors.New("empty tensor name")
	case re.DType == nil:
		return nil, fmt.Errorf("tensor %q: missing dtype", name)
	case re.Shape == nil:
		return nil, fmt.Errorf("tensor %q: missing shape", name)
	case re.DataOffsets == nil:
		return nil, fmt.Errorf("tensor %q: missing data_offsets", name)
	}
	dt := DType(*re.DType)
	if !dt.Valid() {
		return nil, fmt.Errorf("tensor %q: unknown dtype %q", name, *re.DType)
	}
	shape := *re.Shape
	if shape == nil {
		shape = []int64{}
	}
	for _, d := range shape {
		if d < 0 {
			return nil, fmt.Errorf("tensor %q: negative dimension in shape %v", name, shape)
		}
	}
	off := *re.DataOffsets
	if len(off) != 2 {
		return nil, fmt.Errorf("tensor %q: data_offsets %v must hold exactly [begin, end]", name, off)
	}
	if off[0] < 0 || off[1] < off[0] {
		return nil, fmt.Errorf("tensor %q: data_offsets [%d, %d] are not a valid range", name, off[0], off[1])
	}
	info := TensorInfo{Name: name, DType: dt, Shape: shape}
	want := info.ByteSize()
	if want < 0 {
		return nil, fmt.Errorf("tensor %q: shape %v is too large", name, shape)
	}
	if got := off[1] - off[0]; got != want {
		return nil, fmt.Errorf("tensor %q: data_offsets [%d, %d] span %d bytes but %s%v needs %d", name, off[0], off[1], got, dt, shape, want)
	}
	return &entry{info: info, begin: off[0], end: off[1]}, nil
}

// checkOffsets requires the tensors to tile the data section exactly: no
// overlap, no gap, nothing beyond the end of the file and nothing after the
// last tensor, as the reference implementation does.
func checkOffsets(h *header, dataLen int64) error {
	order := slices.Clone(h.names)
	slices.SortFunc(order, func(a, b string) int {
		ea, eb := h.tensors[a], h.tensors[b]
		if ea.begin != eb.begin {
			return cmpInt64(ea.begin, eb.begin)
		}
		return cmpInt64(ea.end, eb.end)
	})
	var pos int64
	prev := ""
	for _, n := range order {
		e := h.tensors[n]
		switch {
		case e.begin < pos:
			return fmt.Errorf("tensor %q: data_offsets [%d, %d] overlap tensor %q ending at %d", n, e.begin, e.end, prev, pos)
		case e.begin > pos:
			return fmt.Errorf("tensor %q: data_offsets [%d, %d] leave a gap after byte %d", n, e.begin, e.end, pos)
		}
		if e.end > dataLen {
			return fmt.Errorf("tensor %q: data_offsets [%d, %d] reach beyond the %d data bytes in the file (truncated file?)", n, e.begin, e.end, dataLen)
		}
		pos, prev = e.end, n
	}
	if pos != dataLen {
		return fmt.Errorf("%d data bytes follow the last tensor (%d bytes of tensors, %d in the file)", dataLen-pos, pos, dataLen)
	}
	return nil
}

func cmpInt64(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// decodeObject decodes a JSON object into its raw members, rejecting
// duplicate keys (encoding/json would silently keep the last one) and
// anything after the closing brace except the spaces the format allows.
func decodeObject(buf []byte) (map[string]json.RawMessage, error) {
	dec := json.NewDecoder(bytes.NewReader(buf))
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, errors.New("header is not a JSON object")
	}
	out := make(map[string]json.RawMessage)
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, ok := tok.(string)
		if !ok {
			return nil, fmt.Errorf("unexpected %v where a key belongs", tok)
		}
		var val json.RawMessage
		if err := dec.Decode(&val); err != nil {
			return nil, fmt.Errorf("value of %q: %w", key, err)
		}
		if _, dup := out[key]; dup {
			return nil, fmt.Errorf("duplicate key %q", key)
		}
		out[key] = val
	}
	if _, err := dec.Token(); err != nil { // the closing '}'
		return nil, err
	}
	rest := buf[dec.InputOffset():]
	if len(bytes.Trim(rest, " \t\r\n\x00")) != 0 {
		return nil, fmt.Errorf("%d unexpected bytes after the JSON object", len(rest))
	}
	return out, nil
}

package transport

import (
	"bytes"
	"errors"
	"fmt"
	"math"

	"github.com/vmihailenco/msgpack/v5"
)

// Kind says what a message carries.
type Kind uint8

const (
	KindActivations Kind = 1 // hidden states from one stage to the next
	KindFinalHidden Kind = 2 // the last stage's final hidden rows, back to the head
	KindControl     Kind = 3 // small out-of-band payloads (an NCCL unique id, a bench ack)
)

// DType is a payload's element type; it fixes the element size that the
// header's shapes are checked against.
type DType uint8

const (
	DTypeBytes DType = iota // opaque bytes (element size 1)
	DTypeBF16
	DTypeF16
	DTypeF32
	DTypeFP8E4M3
	DTypeI32
	DTypeI64
)

// Size is the element size in bytes (0 for an unknown type).
func (d DType) Size() int64 {
	switch d {
	case DTypeBytes, DTypeFP8E4M3:
		return 1
	case DTypeBF16, DTypeF16:
		return 2
	case DTypeF32, DTypeI32:
		return 4
	case DTypeI64:
		return 8
	}
	return 0
}

func (d DType) String() string {
	names := [...]string{"bytes", "bf16", "f16", "f32", "fp8_e4m3", "i32", "i64"}
	if int(d) < len(names) {
		return names[d]
	}
	return fmt.Sprintf("dtype(%d)", uint8(d))
}

// TensorMeta describes one payload: its type, shape and byte count. Both
// ends check Bytes against the shape and against the bytes on the wire (NCCL
// checks no sizes at all).
type TensorMeta struct {
	DType DType
	Shape []int64
	Bytes int64
}

// SeqMeta is what a stage must know about one sequence of the step: where
// its tokens go in the KV cache and which blocks the head gave or freed.
type SeqMeta struct {
	ID          uint64
	Position    int64 // position of the first token of this step
	Tokens      int32 // tokens this step appends
	NewBlocks   []int32
	FreedBlocks []int32
}

// Header is a message's small self-describing part.
type Header struct {
	Step       uint64
	MicroBatch uint32
	Kind       Kind
	Tensors    []TensorMeta
	Seqs       []SeqMeta
}

// Limits bound what a decoder accepts, so a frame's claimed counts never
// become allocations larger than these.
type Limits struct {
	MaxHeaderBytes  int   // encoded header
	MaxMessageBytes int64 // sum of payloads
	MaxTensors      int
	MaxDims         int
	MaxSeqs         int
	MaxBlocks       int // per list
}

// DefaultLimits fit a GLM-4.5 prefill chunk (2048 tokens × 5120 × f32 = 40
// MiB) with room, and a few thousand sequences.
func DefaultLimits() Limits {
	return Limits{MaxHeaderBytes: 1 << 20, MaxMessageBytes: 256 << 20, MaxTensors: 64, MaxDims: 8, MaxSeqs: 8192, MaxBlocks: 4096}
}

const headerVersion = 1

// ErrMalformed marks a frame or header that does not parse or breaks a limit.
var ErrMalformed = errors.New("malformed frame")

// encodeHeader writes h as one msgpack array (no reflection, no maps).
func encodeHeader(e *msgpack.Encoder, h *Header) error {
	e.EncodeArrayLen(6)
	e.EncodeUint(headerVersion)
	e.EncodeUint(h.Step)
	e.EncodeUint(uint64(h.MicroBatch))
	e.EncodeUint(uint64(h.Kind))
	e.EncodeArrayLen(len(h.Tensors))
	for i := range h.Tensors {
		t := &h.Tensors[i]
		e.EncodeArrayLen(3)
		e.EncodeUint(uint64(t.DType))
		e.EncodeArrayLen(len(t.Shape))
		for _, d := range t.Shape {
			e.EncodeInt(d)
		}
		e.EncodeInt(t.Bytes)
	}
	e.EncodeArrayLen(len(h.Seqs))
	for i := range h.Seqs {
		s := &h.Seqs[i]
		e.EncodeArrayLen(5)
		e.EncodeUint(s.ID)
		e.EncodeInt(s.Position)
		e.EncodeInt(int64(s.Tokens))
		encodeInt32s(e, s.NewBlocks)
		if err := encodeInt32s(e, s.FreedBlocks); err != nil {
			return err
		}
	}
	return nil
}

func encodeInt32s(e *msgpack.Encoder, v []int32) error {
	err := e.EncodeArrayLen(len(v))
	for _, x := range v {
		err = e.EncodeInt(int64(x))
	}
	return err
}

// headerDecoder decodes into a reused Header; every claimed length is
// checked against the limits and against the bytes left before anything is
// allocated (each element takes at least one byte).
type headerDecoder struct {
	d   *msgpack.Decoder
	r   *bytes.Reader
	lim Limits
}

func (hd *headerDecoder) arrayLen(max int, what string) (int, error) {
	n, err := hd.d.DecodeArrayLen()
	if err != nil {
		return 0, fmt.Errorf("%w: %s: %v", ErrMalformed, what, err)
	}
	if n < 0 || n > max || n > hd.r.Len() {
		return 0, fmt.Errorf("%w: %s: %d entries (limit %d, %d bytes left)", ErrMalformed, what, n, max, hd.r.Len())
	}
	return n, nil
}

func (hd *headerDecoder) uint(max uint64, what string) (uint64, error) {
	v, err := hd.d.DecodeUint64()
	if err != nil {
		return 0, fmt.Errorf("%w: %s: %v", ErrMalformed, what, err)
	}
	if v > max {
		return 0, fmt.Errorf("%w: %s = %d (max %d)", ErrMalformed, what, v, max)
	}
	return v, nil
}

func (hd *headerDecoder) int(min, max int64, what string) (int64, error) {
	v, err := hd.d.DecodeInt64()
	if err != nil {
		return 0, fmt.Errorf("%w: %s: %v", ErrMalformed, what, err)
	}
	if v < min || v > max {
		return 0, fmt.Errorf("%w: %s = %d (range %d…%d)", ErrMalformed, what, v, min, max)
	}
	return v, nil
}

// decode fills h from the decoder's bytes, reusing h's slices.
func (hd *headerDecoder) decode(h *Header) error {
	n, err := hd.arrayLen(16, "header")
	if err != nil {
		return err
	}
	if n != 6 {
		return fmt.Errorf("%w: header has %d fields, want 6", ErrMalformed, n)
	}
	if _, err := hd.uint(headerVersion, "header version"); err != nil {
		return err
	}
	if h.Step, err = hd.uint(math.MaxUint64, "step"); err != nil {
		return err
	}
	mb, err := hd.uint(math.MaxUint32, "micro-batch")
	if err != nil {
		return err
	}
	h.MicroBatch = uint32(mb)
	k, err := hd.uint(math.MaxUint8, "kind")
	if err != nil {
		return err
	}
	h.Kind = Kind(k)
	if err := hd.tensors(h); err != nil {
		return err
	}
	return hd.seqs(h)
}

func (hd *headerDecoder) tensors(h *Header) error {
	n, err := hd.arrayLen(hd.lim.MaxTensors, "tensors")
	if err != nil {
		return err
	}
	h.Tensors = grow(h.Tensors, n)
	for i := range h.Tensors {
		t := &h.Tensors[i]
		if f, err := hd.arrayLen(3, "tensor"); err != nil || f != 3 {
			return fmt.Errorf("%w: tensor %d: want 3 fields (%v)", ErrMalformed, i, err)
		}
		dt, err := hd.uint(math.MaxUint8, "dtype")
		if err != nil {
			return err
		}
		t.DType = DType(dt)
		dims, err := hd.arrayLen(hd.lim.MaxDims, "shape")
		if err != nil {
			return err
		}
		t.Shape = grow(t.Shape, dims)
		for j := range t.Shape {
			if t.Shape[j], err = hd.int(0, hd.lim.MaxMessageBytes, "dimension"); err != nil {
				return err
			}
		}
		if t.Bytes, err = hd.int(0, hd.lim.MaxMessageBytes, "tensor bytes"); err != nil {
			return err
		}
	}
	return nil
}

func (hd *headerDecoder) seqs(h *Header) error {
	n, err := hd.arrayLen(hd.lim.MaxSeqs, "sequences")
	if err != nil {
		return err
	}
	h.Seqs = grow(h.Seqs, n)
	for i := range h.Seqs {
		s := &h.Seqs[i]
		if f, err := hd.arrayLen(5, "sequence"); err != nil || f != 5 {
			return fmt.Errorf("%w: sequence %d: want 5 fields (%v)", ErrMalformed, i, err)
		}
		if s.ID, err = hd.uint(math.MaxUint64, "sequence id"); err != nil {
			return err
		}
		if s.Position, err = hd.int(0, math.MaxInt64, "position"); err != nil {
			return err
		}
		tok, err := hd.int(0, math.MaxInt32, "tokens")
		if err != nil {
			return err
		}
		s.Tokens = int32(tok)
		if s.NewBlocks, err = hd.int32s(s.NewBlocks, "new blocks"); err != nil {
			return err
		}
		if s.FreedBlocks, err = hd.int32s(s.FreedBlocks, "freed blocks"); err != nil {
			return err
		}
	}
	return nil
}

func (hd *headerDecoder) int32s(v []int32, what string) ([]int32, error) {
	n, err := hd.arrayLen(hd.lim.MaxBlocks, what)
	if err != nil {
		return v, err
	}
	v = grow(v, n)
	for i := range v {
		x, err := hd.int(math.MinInt32, math.MaxInt32, what)
		if err != nil {
			return v, err
		}
		v[i] = int32(x)
	}
	return v, nil
}

// grow returns v resized to n, reusing its array when it is big enough.
func grow[T any](v []T, n int) []T {
	if cap(v) >= n {
		return v[:n]
	}
	return make([]T, n)
}

// Validate checks the header's own consistency: known dtypes, shapes whose
// element counts match the byte counts, and the total within the limit. It
// returns the total payload bytes.
func (h *Header) Validate(lim Limits) (int64, error) {
	var total int64
	for i := range h.Tensors {
		t := &h.Tensors[i]
		size := t.DType.Size()
		if size == 0 {
			return 0, fmt.Errorf("%w: tensor %d: unknown %v", ErrMalformed, i, t.DType)
		}
		if t.Bytes < 0 || t.Bytes > lim.MaxMessageBytes {
			return 0, fmt.Errorf("%w: tensor %d: %d bytes (limit %d)", ErrMalformed, i, t.Bytes, lim.MaxMessageBytes)
		}
		elems := int64(1)
		for _, d := range t.Shape {
			if d < 0 || (d > 0 && elems > lim.MaxMessageBytes/d) {
				return 0, fmt.Errorf("%w: tensor %d: shape %v too large", ErrMalformed, i, t.Shape)
			}
			elems *= d
		}
		if elems*size != t.Bytes {
			return 0, fmt.Errorf("%w: tensor %d: shape %v of %v is %d bytes, header says %d", ErrMalformed, i, t.Shape, t.DType, elems*size, t.Bytes)
		}
		total += t.Bytes
		if total > lim.MaxMessageBytes {
			return 0, fmt.Errorf("%w: payloads total over %d bytes (limit)", ErrMalformed, lim.MaxMessageBytes)
		}
	}
	return total, nil
}

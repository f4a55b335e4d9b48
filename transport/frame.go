package transport

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"github.com/vmihailenco/msgpack/v5"
)

// A frame on a byte stream is a fixed prefix, the msgpack header, then the
// payloads back to back (their sizes are in the header):
//
//	magic "GLT1" | header length u32 | payload length u64   (little endian)
const (
	frameMagic  = "GLT1"
	PrefixBytes = 16
)

// Buffer is one payload: host bytes, or Bytes of device memory at Dev (a
// CUDA device pointer, moved through a Stager).
type Buffer struct {
	Host  []byte
	Dev   uintptr
	Bytes int64 // for device buffers; host buffers use len(Host)
}

// HostBuffer wraps host bytes.
func HostBuffer(b []byte) Buffer { return Buffer{Host: b} }

// Len is the payload's size in bytes.
func (b *Buffer) Len() int64 {
	if b.Dev != 0 {
		return b.Bytes
	}
	return int64(len(b.Host))
}

// Message is a header and one payload per header tensor.
type Message struct {
	Header   Header
	Payloads []Buffer
}

// PayloadBytes checks that each payload matches its tensor's byte count and
// returns the total.
func (m *Message) PayloadBytes(lim Limits) (int64, error) {
	total, err := m.Header.Validate(lim)
	if err != nil {
		return 0, err
	}
	if len(m.Payloads) != len(m.Header.Tensors) {
		return 0, fmt.Errorf("%d payloads for %d tensors", len(m.Payloads), len(m.Header.Tensors))
	}
	for i := range m.Payloads {
		if n := m.Payloads[i].Len(); n != m.Header.Tensors[i].Bytes {
			return 0, fmt.Errorf("payload %d has %d bytes, tensor says %d", i, n, m.Header.Tensors[i].Bytes)
		}
	}
	return total, nil
}

// Codec encodes and decodes frame prefixes and headers, reusing its buffers
// (one per direction of a link; not safe for concurrent use).
type Codec struct {
	Limits Limits
	out    bytes.Buffer
	enc    *msgpack.Encoder
	in     bytes.Reader
	dec    *msgpack.Decoder
}

// NewCodec returns a codec enforcing lim.
func NewCodec(lim Limits) *Codec {
	c := &Codec{Limits: lim}
	c.enc = msgpack.NewEncoder(&c.out)
	c.dec = msgpack.NewDecoder(&c.in)
	return c
}

// EncodeHeader returns h's encoding, valid until the next call.
func (c *Codec) EncodeHeader(h *Header) ([]byte, error) {
	c.out.Reset()
	if err := encodeHeader(c.enc, h); err != nil {
		return nil, fmt.Errorf("encode header: %w", err)
	}
	if c.out.Len() > c.Limits.MaxHeaderBytes {
		return nil, fmt.Errorf("header of %d bytes over the %d-byte limit", c.out.Len(), c.Limits.MaxHeaderBytes)
	}
	return c.out.Bytes(), nil
}

// DecodeHeader decodes b into h (reusing h's slices); b must hold exactly
// one header.
func (c *Codec) DecodeHeader(b []byte, h *Header) error {
	// The decoder reads c.in directly (a bytes.Reader is an io.ByteScanner,
	// so it keeps no buffer of its own): resetting c.in is enough.
	c.in.Reset(b)
	hd := headerDecoder{d: c.dec, r: &c.in, lim: c.Limits}
	if err := hd.decode(h); err != nil {
		return err
	}
	if c.in.Len() != 0 {
		return fmt.Errorf("%w: %d bytes after the header", ErrMalformed, c.in.Len())
	}
	return nil
}

// PutPrefix writes a frame prefix into p.
func PutPrefix(p *[PrefixBytes]byte, headerLen int, payloadLen int64) {
	copy(p[:4], frameMagic)
	binary.LittleEndian.PutUint32(p[4:8], uint32(headerLen))
	binary.LittleEndian.PutUint64(p[8:16], uint64(payloadLen))
}

// ParsePrefix checks a prefix against the limits and returns the lengths.
func (c *Codec) ParsePrefix(p *[PrefixBytes]byte) (headerLen int, payloadLen int64, err error) {
	if string(p[:4]) != frameMagic {
		return 0, 0, fmt.Errorf("%w: bad magic %q", ErrMalformed, p[:4])
	}
	h := binary.LittleEndian.Uint32(p[4:8])
	n := binary.LittleEndian.Uint64(p[8:16])
	if h == 0 || int64(h) > int64(c.Limits.MaxHeaderBytes) {
		return 0, 0, fmt.Errorf("%w: header length %d (limit %d)", ErrMalformed, h, c.Limits.MaxHeaderBytes)
	}
	if n > uint64(c.Limits.MaxMessageBytes) {
		return 0, 0, fmt.Errorf("%w: payload length %d (limit %d)", ErrMalformed, n, c.Limits.MaxMessageBytes)
	}
	return int(h), int64(n), nil
}

// CheckPayload verifies a decoded header against the payload length that the
// prefix announced.
func (c *Codec) CheckPayload(h *Header, payloadLen int64) error {
	total, err := h.Validate(c.Limits)
	if err != nil {
		return err
	}
	if total != payloadLen {
		return fmt.Errorf("%w: tensors total %d bytes, frame carries %d", ErrMalformed, total, payloadLen)
	}
	return nil
}

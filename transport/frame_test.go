package transport

import (
	"bytes"
	"errors"
	"reflect"
	"testing"
)

func sampleHeader() Header {
	return Header{
		Step: 42, MicroBatch: 3, Kind: KindActivations,
		Tensors: []TensorMeta{{DType: DTypeBF16, Shape: []int64{4, 5120}, Bytes: 4 * 5120 * 2}, {DType: DTypeI32, Shape: []int64{4}, Bytes: 16}},
		Seqs: []SeqMeta{{ID: 7, Position: 100, Tokens: 1, NewBlocks: []int32{9}, FreedBlocks: []int32{}},
			{ID: 8, Position: 0, Tokens: 3, NewBlocks: []int32{}, FreedBlocks: []int32{1, 2}}},
	}
}

func TestHeaderRoundTrip(t *testing.T) {
	c := NewCodec(DefaultLimits())
	h := sampleHeader()
	b, err := c.EncodeHeader(&h)
	if err != nil {
		t.Fatal(err)
	}
	var got Header
	if err := c.DecodeHeader(b, &got); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(normalize(got), normalize(h)) {
		t.Fatalf("decoded %+v\nwant %+v", got, h)
	}
	if n, err := got.Validate(DefaultLimits()); err != nil || n != 4*5120*2+16 {
		t.Fatalf("Validate = %d, %v", n, err)
	}
}

// TestHeaderReusesSlices: decoding into a header that already has room
// allocates nothing (the steady path of a link).
func TestHeaderReusesSlices(t *testing.T) {
	c := NewCodec(DefaultLimits())
	h := sampleHeader()
	b, _ := c.EncodeHeader(&h)
	b = append([]byte(nil), b...)
	var got Header
	c.DecodeHeader(b, &got)
	allocs := testing.AllocsPerRun(100, func() {
		if err := c.DecodeHeader(b, &got); err != nil {
			t.Fatal(err)
		}
	})
	if allocs > 0 {
		t.Fatalf("decode allocates %.1f times per header", allocs)
	}
}

func TestHeaderRejects(t *testing.T) {
	lim := DefaultLimits()
	cases := []struct {
		name string
		edit func(h *Header)
	}{
		{"bytes disagree with shape", func(h *Header) { h.Tensors[0].Bytes++ }},
		{"unknown dtype", func(h *Header) { h.Tensors[0].DType = 99 }},
		{"negative dimension", func(h *Header) { h.Tensors[0].Shape[0] = -1 }},
		{"over the message limit", func(h *Header) {
			h.Tensors[0].Shape = []int64{lim.MaxMessageBytes}
			h.Tensors[0].Bytes = 2 * lim.MaxMessageBytes
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := sampleHeader()
			tc.edit(&h)
			if _, err := h.Validate(lim); !errors.Is(err, ErrMalformed) {
				t.Fatalf("Validate = %v, want ErrMalformed", err)
			}
		})
	}
}

// TestHugeClaimedCounts: a header claiming a million tensors in a few bytes
// is refused before anything of that size is allocated.
func TestHugeClaimedCounts(t *testing.T) {
	c := NewCodec(DefaultLimits())
	// fixarray(6), version 1, step 0, mb 0, kind 1, array32 of 0x7fffffff tensors.
	b := []byte{0x96, 1, 0, 0, 1, 0xdd, 0x7f, 0xff, 0xff, 0xff}
	var h Header
	allocs := testing.AllocsPerRun(10, func() {
		if err := c.DecodeHeader(b, &h); !errors.Is(err, ErrMalformed) {
			t.Fatalf("decode = %v, want ErrMalformed", err)
		}
	})
	if allocs > 4 {
		t.Fatalf("a refused header allocated %.0f times", allocs)
	}
}

func TestPrefix(t *testing.T) {
	c := NewCodec(DefaultLimits())
	var p [PrefixBytes]byte
	PutPrefix(&p, 100, 1<<20)
	if h, n, err := c.ParsePrefix(&p); err != nil || h != 100 || n != 1<<20 {
		t.Fatalf("ParsePrefix = %d, %d, %v", h, n, err)
	}
	PutPrefix(&p, 100, 1<<40)
	if _, _, err := c.ParsePrefix(&p); !errors.Is(err, ErrMalformed) {
		t.Fatalf("oversized payload: %v", err)
	}
	PutPrefix(&p, 0, 0)
	if _, _, err := c.ParsePrefix(&p); !errors.Is(err, ErrMalformed) {
		t.Fatalf("empty header: %v", err)
	}
	copy(p[:4], "HTTP")
	if _, _, err := c.ParsePrefix(&p); !errors.Is(err, ErrMalformed) {
		t.Fatalf("bad magic: %v", err)
	}
}

// FuzzDecodeFrame: any bytes are a frame, an error, never a panic; a header
// that decodes re-encodes to something that decodes the same.
func FuzzDecodeFrame(f *testing.F) {
	c := NewCodec(DefaultLimits())
	h := sampleHeader()
	b, _ := c.EncodeHeader(&h)
	var p [PrefixBytes]byte
	PutPrefix(&p, len(b), 4*5120*2+16)
	f.Add(append(p[:], b...))
	f.Add([]byte("GLT1\x05\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x95\x01\x00\x00\x01"))
	f.Fuzz(func(t *testing.T, data []byte) {
		lim := DefaultLimits()
		lim.MaxHeaderBytes = 4096
		c := NewCodec(lim)
		if len(data) < PrefixBytes {
			return
		}
		var p [PrefixBytes]byte
		copy(p[:], data)
		hl, n, err := c.ParsePrefix(&p)
		if err != nil {
			return
		}
		rest := data[PrefixBytes:]
		if hl > len(rest) {
			return
		}
		var h Header
		if err := c.DecodeHeader(rest[:hl], &h); err != nil {
			return
		}
		_ = c.CheckPayload(&h, n)
		again, err := c.EncodeHeader(&h)
		if err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		var h2 Header
		if err := c.DecodeHeader(bytes.Clone(again), &h2); err != nil {
			t.Fatalf("re-decode: %v", err)
		}
		if !reflect.DeepEqual(normalize(h), normalize(h2)) {
			t.Fatalf("round trip changed the header:\n%+v\n%+v", h, h2)
		}
	})
}

// normalize maps empty slices to nil for comparison.
func normalize(h Header) Header {
	if len(h.Tensors) == 0 {
		h.Tensors = nil
	}
	for i := range h.Tensors {
		if len(h.Tensors[i].Shape) == 0 {
			h.Tensors[i].Shape = nil
		}
	}
	if len(h.Seqs) == 0 {
		h.Seqs = nil
	}
	for i := range h.Seqs {
		if len(h.Seqs[i].NewBlocks) == 0 {
			h.Seqs[i].NewBlocks = nil
		}
		if len(h.Seqs[i].FreedBlocks) == 0 {
			h.Seqs[i].FreedBlocks = nil
		}
	}
	return h
}

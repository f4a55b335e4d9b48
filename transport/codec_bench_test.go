package transport

import "testing"

func BenchmarkEncodeHeader(b *testing.B) {
	c := NewCodec(DefaultLimits())
	h := sampleHeader()
	b.ReportAllocs()
	for b.Loop() {
		c.EncodeHeader(&h)
	}
}

func BenchmarkDecodeHeader(b *testing.B) {
	c := NewCodec(DefaultLimits())
	h := sampleHeader()
	enc, _ := c.EncodeHeader(&h)
	enc = append([]byte(nil), enc...)
	var out Header
	b.ReportAllocs()
	for b.Loop() {
		c.DecodeHeader(enc, &out)
	}
}

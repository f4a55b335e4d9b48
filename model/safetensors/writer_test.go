package safetensors

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// pattern fills n bytes deterministically from seed.
func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*31) ^ seed
	}
	return b
}

func TestWriterRoundTripEachDType(t *testing.T) {
	dtypes := []DType{F64, F32, F16, BF16, F8E4M3, F8E5M2, I64, I32, I16, I8, U64, U32, U16, U8, Bool}
	var infos []TensorInfo
	data := map[string][]byte{}
	for i, dt := range dtypes {
		ti := TensorInfo{Name: "t." + string(dt), DType: dt, Shape: []int64{3, int64(i + 1)}}
		infos = append(infos, ti)
		data[ti.Name] = pattern(int(ti.ByteSize()), byte(i))
	}
	infos = append(infos, TensorInfo{Name: "scalar", DType: F32, Shape: []int64{}}, TensorInfo{Name: "empty", DType: BF16, Shape: []int64{0, 5}})
	data["scalar"] = pattern(4, 9)
	data["empty"] = nil
	path := filepath.Join(t.TempDir(), "all.safetensors")
	meta := map[string]string{"format": "pt", "note": "round trip"}
	w, err := NewWriter(path, infos, meta)
	if err != nil {
		t.Fatal(err)
	}
	// Write in reverse declaration order: the writer places each tensor itself.
	for i := len(infos) - 1; i >= 0; i-- {
		if err := w.Write(infos[i].Name, data[infos[i].Name]); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	f, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if !maps2Equal(f.Metadata(), meta) {
		t.Errorf("metadata %v, want %v", f.Metadata(), meta)
	}
	if len(f.Names()) != len(infos) {
		t.Errorf("%d tensors, want %d", len(f.Names()), len(infos))
	}
	for _, ti := range infos {
		tn, err := f.TensorAs(ti.Name, ti.DType, ti.Shape...)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(tn.Data, data[ti.Name]) {
			t.Errorf("%s: data differs", ti.Name)
		}
		// Alignment: each tensor starts at a multiple of its element size.
		if off := f.hdr.dataStart + f.hdr.tensors[ti.Name].begin; off%int64(ti.DType.Size()) != 0 {
			t.Errorf("%s at file offset %d, not aligned to %d", ti.Name, off, ti.DType.Size())
		}
	}
	if f.hdr.dataStart%8 != 0 {
		t.Errorf("data starts at %d, header not padded to 8", f.hdr.dataStart)
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o644 {
		t.Errorf("mode %v", st.Mode())
	}
}

func maps2Equal(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func TestWriterDecodedValues(t *testing.T) {
	vals := []float32{1, -0.5, 3.140625, 1e-3, -448, 65504}
	path := filepath.Join(t.TempDir(), "v.safetensors")
	n := int64(len(vals))
	infos := []TensorInfo{
		{Name: "f32", DType: F32, Shape: []int64{n}},
		{Name: "bf16", DType: BF16, Shape: []int64{n}},
		{Name: "f16", DType: F16, Shape: []int64{n}},
		{Name: "e4m3", DType: F8E4M3, Shape: []int64{n}},
		{Name: "i64", DType: I64, Shape: []int64{2}},
		{Name: "i32", DType: I32, Shape: []int64{2}},
	}
	w, err := NewWriter(path, infos, nil)
	if err != nil {
		t.Fatal(err)
	}
	b32 := make([]byte, 4*n)
	F32ToBytes(b32, vals)
	b16 := make([]byte, 2*n)
	F32ToBF16Bytes(b16, vals)
	h16 := make([]byte, 2*n)
	F32ToF16Bytes(h16, vals)
	b8 := make([]byte, n)
	F32ToE4M3Bytes(b8, vals)
	i64 := binary.LittleEndian.AppendUint64(binary.LittleEndian.AppendUint64(nil, uint64(1)<<40), math.MaxUint64) // 2^40, -1
	i32 := binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint32(nil, 7), math.MaxUint32)             // 7, -1
	for name, b := range map[string][]byte{"f32": b32, "bf16": b16, "f16": h16, "e4m3": b8, "i64": i64, "i32": i32} {
		if err := w.Write(name, b); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	f, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	wantF := map[string]func(float32) float32{
		"f32":  func(x float32) float32 { return x },
		"bf16": func(x float32) float32 { return BF16ToF32(F32ToBF16(x)) },
		"f16":  func(x float32) float32 { return F16ToF32(F32ToF16(x)) },
		"e4m3": func(x float32) float32 { return E4M3ToF32(F32ToE4M3(x)) },
	}
	for name, conv := range wantF {
		tn, _ := f.Tensor(name)
		got, err := tn.Float32()
		if err != nil {
			t.Fatal(err)
		}
		for i, v := range vals {
			if got[i] != conv(v) {
				t.Errorf("%s[%d] = %v, want %v", name, i, got[i], conv(v))
			}
		}
	}
	for name, want := range map[string][]int64{"i64": {1 << 40, -1}, "i32": {7, -1}} {
		tn, _ := f.Tensor(name)
		got, err := tn.Int64()
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("%s = %v, %v; want %v", name, got, err, want)
		}
	}
	tn, _ := f.Tensor("i64")
	if _, err := tn.Float32(); err == nil {
		t.Error("Float32 of I64 succeeded")
	}
	if err := (Tensor{TensorInfo: TensorInfo{Name: "x", DType: F32, Shape: []int64{3}}, Data: make([]byte, 8)}).Float32Into(make([]float32, 3)); err == nil {
		t.Error("Float32Into accepted data of the wrong size")
	}
}

func TestShardedRoundTrip(t *testing.T) {
	dir := t.TempDir()
	weightMap := map[string]string{}
	var total int64
	want := map[string][]byte{}
	for s := range 3 {
		shard := fmt.Sprintf("model-%05d-of-00003.safetensors", s+1)
		var infos []TensorInfo
		for k := range 4 {
			ti := TensorInfo{Name: fmt.Sprintf("layers.%d.w%d", s, k), DType: BF16, Shape: []int64{int64(k + 2), 8}}
			infos = append(infos, ti)
			weightMap[ti.Name] = shard
			total += ti.ByteSize()
			want[ti.Name] = pattern(int(ti.ByteSize()), byte(s*4+k))
		}
		w, err := NewWriter(filepath.Join(dir, shard), infos, map[string]string{"format": "pt"})
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range w.Order() { // sequential order
			if err := w.WriteTensor(n, func(dst io.Writer) error {
				// Stream in small pieces.
				b := want[n]
				for len(b) > 0 {
					k := min(len(b), 5)
					if _, err := dst.Write(b[:k]); err != nil {
						return err
					}
					b = b[k:]
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if err := WriteIndex(dir, weightMap, total); err != nil {
		t.Fatal(err)
	}
	c, err := OpenDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if len(c.Names()) != len(want) {
		t.Fatalf("%d names, want %d", len(c.Names()), len(want))
	}
	tn, err := c.Tensor("layers.1.w3")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(tn.Data, want["layers.1.w3"]) || tn.File != "model-00002-of-00003.safetensors" {
		t.Errorf("layers.1.w3 from %s differs", tn.File)
	}
	if m := c.Mapped(); !slices.Equal(m, []string{"model-00002-of-00003.safetensors"}) {
		t.Errorf("mapped %v, want only shard 2", m)
	}
	for name, b := range want {
		tn, err := c.Tensor(name)
		if err != nil || !bytes.Equal(tn.Data, b) {
			t.Errorf("%s: %v or data differs", name, err)
		}
	}
	raw, _ := os.ReadFile(filepath.Join(dir, IndexFile))
	if !strings.Contains(string(raw), fmt.Sprintf(`"total_size": %d`, total)) {
		t.Errorf("index lacks total_size %d:\n%s", total, raw)
	}
}

func TestWriterErrors(t *testing.T) {
	dir := t.TempDir()
	two := []TensorInfo{{Name: "a", DType: F32, Shape: []int64{2}}, {Name: "b", DType: U8, Shape: []int64{3}}}
	newW := func(t *testing.T, name string) *Writer {
		w, err := NewWriter(filepath.Join(dir, name), two, nil)
		if err != nil {
			t.Fatal(err)
		}
		return w
	}
	declTests := []struct {
		name  string
		infos []TensorInfo
		want  string
	}{
		{"duplicate", []TensorInfo{two[0], two[0]}, "declared twice"},
		{"unknown dtype", []TensorInfo{{Name: "x", DType: "F4", Shape: []int64{1}}}, "unknown dtype"},
		{"negative shape", []TensorInfo{{Name: "x", DType: F32, Shape: []int64{-1}}}, "invalid shape"},
		{"metadata name", []TensorInfo{{Name: "__metadata__", DType: F32, Shape: []int64{1}}}, "invalid tensor name"},
		{"empty name", []TensorInfo{{Name: "", DType: F32, Shape: []int64{1}}}, "invalid tensor name"},
	}
	for _, tc := range declTests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := NewWriter(filepath.Join(dir, "d.safetensors"), tc.infos, nil); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("NewWriter: %v, want %q", err, tc.want)
			}
		})
	}
	writeTests := []struct {
		name string
		run  func(w *Writer) error
		want string
	}{
		{"short tensor", func(w *Writer) error {
			w.Write("a", make([]byte, 8))
			w.Write("b", make([]byte, 2))
			return w.Close()
		}, `tensor "b" (U8[3]): wrote 2 of 3 bytes`},
		{"long tensor", func(w *Writer) error {
			w.Write("a", make([]byte, 9))
			return w.Close()
		}, "more bytes than the tensor's size"},
		{"missing tensor", func(w *Writer) error {
			w.Write("a", make([]byte, 8))
			return w.Close()
		}, `1 tensors never written, first "b"`},
		{"undeclared", func(w *Writer) error { return w.Write("c", nil) }, `tensor "c" was not declared`},
		{"twice", func(w *Writer) error {
			w.Write("b", make([]byte, 3))
			return w.Write("b", make([]byte, 3))
		}, "written twice"},
		{"fill error", func(w *Writer) error {
			w.WriteTensor("a", func(io.Writer) error { return fmt.Errorf("disk on fire") })
			w.Write("b", make([]byte, 3))
			return w.Close()
		}, "disk on fire"},
	}
	for _, tc := range writeTests {
		t.Run(tc.name, func(t *testing.T) {
			name := strings.ReplaceAll(tc.name, " ", "_") + ".safetensors"
			w := newW(t, name)
			err := tc.run(w)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want %q", err, tc.want)
			}
			w.Abort()
			if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
				t.Error("a failed write left the file in place")
			}
		})
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 0 {
		t.Errorf("temporary files left behind: %v", ents)
	}
	if err := WriteIndex(dir, map[string]string{"a": "/etc/passwd"}, 1); err == nil {
		t.Error("WriteIndex accepted an absolute shard path")
	}
}

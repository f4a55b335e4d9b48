package safetensors

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// rawFile builds safetensors bytes from a literal header and data length.
func rawFile(header string, dataLen int) []byte {
	b := make([]byte, 8, 8+len(header)+dataLen)
	binary.LittleEndian.PutUint64(b, uint64(len(header)))
	b = append(b, header...)
	return append(b, make([]byte, dataLen)...)
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestOpenRejectsBadFiles(t *testing.T) {
	const good = `{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`
	hugeLen := make([]byte, 16)
	binary.LittleEndian.PutUint64(hugeLen, 1<<40)
	overLen := rawFile(good, 8)
	binary.LittleEndian.PutUint64(overLen, uint64(len(overLen)))
	tests := []struct {
		name    string
		file    []byte
		wantErr string // a fragment of the error besides the file name
		tensor  string // the tensor the error must name, if any
	}{
		{"empty file", nil, "shorter than the 8-byte header length", ""},
		{"seven bytes", []byte{1, 2, 3, 4, 5, 6, 7}, "shorter than the 8-byte", ""},
		{"absurd header length", hugeLen, "exceeds the 100000000-byte limit", ""},
		{"header longer than file", overLen, "exceeds the file size", ""},
		{"truncated data", rawFile(good, 7), "beyond the 7 data bytes", "a"},
		{"trailing bytes", rawFile(good, 9), "1 data bytes follow the last tensor", ""},
		{"not json", rawFile(`hello`, 0), "does not start with '{'", ""},
		{"malformed json", rawFile(`{"a":{"dtype":"F32",`, 0), "malformed header JSON", ""},
		{"json array", rawFile(`[1,2]`, 0), "does not start with '{'", ""},
		{"garbage after json", rawFile(`{}x`, 0), "malformed header JSON", ""},
		{"duplicate tensor", rawFile(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, 8), `duplicate key "a"`, ""},
		{"unknown dtype", rawFile(`{"a":{"dtype":"F7","shape":[2],"data_offsets":[0,8]}}`, 8), `unknown dtype "F7"`, "a"},
		{"missing dtype", rawFile(`{"a":{"shape":[2],"data_offsets":[0,8]}}`, 8), "missing dtype", "a"},
		{"missing shape", rawFile(`{"a":{"dtype":"F32","data_offsets":[0,8]}}`, 8), "missing shape", "a"},
		{"missing offsets", rawFile(`{"a":{"dtype":"F32","shape":[2]}}`, 8), "missing data_offsets", "a"},
		{"negative dim", rawFile(`{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}`, 8), "negative dimension", "a"},
		{"fractional dim", rawFile(`{"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}}`, 8), "malformed entry", "a"},
		{"shape overflow", rawFile(`{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}`, 8), "too large", "a"},
		{"three offsets", rawFile(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4,8]}}`, 8), "exactly [begin, end]", "a"},
		{"reversed offsets", rawFile(`{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}`, 8), "not a valid range", "a"},
		{"size mismatch", rawFile(`{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}`, 8), "span 8 bytes but F32[3] needs 12", "a"},
		{"overlap", rawFile(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, 8), "overlap", "b"},
		{"gap", rawFile(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, 8), "gap", "a"},
		{"metadata not strings", rawFile(`{"__metadata__":{"k":1}}`, 0), "__metadata__ is not a string map", ""},
		{"entry not object", rawFile(`{"a":5}`, 0), "malformed entry", "a"},
		{"empty name", rawFile(`{"":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`, 8), "empty tensor name", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "bad.safetensors")
			writeFile(t, path, tc.file)
			f, err := Open(path)
			if err == nil {
				f.Close()
				t.Fatal("Open succeeded")
			}
			msg := err.Error()
			if !strings.Contains(msg, tc.wantErr) || !strings.Contains(msg, path) {
				t.Errorf("error %q lacks %q or the path", msg, tc.wantErr)
			}
			if tc.tensor != "" && !strings.Contains(msg, `"`+tc.tensor+`"`) {
				t.Errorf("error %q does not name tensor %q", msg, tc.tensor)
			}
			// The same bytes through a directory: the error is the same.
			if _, err := OpenDir(path); err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("OpenDir: %v", err)
			}
		})
	}
}

func TestOpenAcceptsEdgeCases(t *testing.T) {
	tests := []struct {
		name   string
		file   []byte
		tensor string
		shape  []int64
		size   int
	}{
		{"empty header", rawFile(`{}`, 0), "", nil, 0},
		{"space padded header", rawFile(`{"s":{"dtype":"I64","shape":[],"data_offsets":[0,8]}}    `, 8), "s", []int64{}, 8},
		{"zero sized tensor", rawFile(`{"z":{"dtype":"BF16","shape":[0,4],"data_offsets":[0,0]},"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}`, 3), "z", []int64{0, 4}, 0},
		{"unsorted offsets", rawFile(`{"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}`, 2), "b", []int64{1}, 1},
		{"metadata", rawFile(`{"__metadata__":{"format":"pt"},"x":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}}`, 2), "x", []int64{2}, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "ok.safetensors")
			writeFile(t, path, tc.file)
			f, err := Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if tc.tensor == "" {
				if len(f.Names()) != 0 {
					t.Errorf("names %v", f.Names())
				}
				return
			}
			tn, err := f.Tensor(tc.tensor)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(tn.Shape, tc.shape) || len(tn.Data) != tc.size || tn.File != path {
				t.Errorf("tensor %v with %d bytes, want shape %v and %d bytes", tn.TensorInfo, len(tn.Data), tc.shape, tc.size)
			}
		})
	}
}

const tinyModel = "../../testdata/glm4moe/tiny/model"

func TestFixtureCheckpoint(t *testing.T) {
	c, err := OpenDir(tinyModel)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if n := len(c.Names()); n != 173 {
		t.Errorf("%d tensors, want the index's 173", n)
	}
	if m := c.Mapped(); len(m) != 0 {
		t.Errorf("mapped %v before any tensor was read", m)
	}
	// Values decoded independently from the file bytes (bf16 bits << 16).
	lm, err := c.TensorAs("lm_head.weight", BF16, 1024, 64)
	if err != nil {
		t.Fatal(err)
	}
	if lm.File != "model-00001-of-00002.safetensors" {
		t.Errorf("lm_head in %q", lm.File)
	}
	if got := c.Mapped(); !slices.Equal(got, []string{"model-00001-of-00002.safetensors"}) {
		t.Errorf("mapped %v after reading one tensor of shard 1", got)
	}
	v, err := lm.Float32()
	if err != nil {
		t.Fatal(err)
	}
	want := []float32{-0.11865234375, -0.1474609375, -0.109375, 0.0576171875}
	if !slices.Equal(v[:4], want) || v[len(v)-1] != 0.193359375 {
		t.Errorf("lm_head values %v ... %v, want %v ... 0.193359375", v[:4], v[len(v)-1], want)
	}
	bias, err := c.TensorAs("model.layers.1.mlp.gate.e_score_correction_bias", F32, 8)
	if err != nil {
		t.Fatal(err)
	}
	bv, _ := bias.Float32()
	wantBias := []float32{-0.3854461908340454, 0.027464600279927254, -0.12619590759277344, -0.031592678278684616}
	if !slices.Equal(bv[:4], wantBias) {
		t.Errorf("bias %v, want %v", bv[:4], wantBias)
	}
	// Expectation failures name file, tensor, got and want.
	_, err = c.TensorAs("lm_head.weight", F32, 64, 1024)
	for _, frag := range []string{"model-00001-of-00002.safetensors", "lm_head.weight", "BF16[1024 64]", "F32[64 1024]"} {
		if err == nil || !strings.Contains(err.Error(), frag) {
			t.Errorf("TensorAs mismatch error %v lacks %q", err, frag)
		}
	}
	if _, err := c.Tensor("model.layers.99.nothing"); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "model.layers.99.nothing") {
		t.Errorf("missing tensor error %v", err)
	}
	if _, ok := c.Info("model.layers.99.nothing"); ok {
		t.Error("Info found a missing tensor")
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Tensor("lm_head.weight"); err == nil {
		t.Error("Tensor after Close succeeded")
	}
}

func TestFixtureGoldens(t *testing.T) {
	f, err := Open("../../testdata/glm4moe/tiny/golden.safetensors")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	raw, err := os.ReadFile("../../testdata/glm4moe/tiny/golden.json")
	if err != nil {
		t.Fatal(err)
	}
	var gj struct{ Prompts, Greedy [][]int64 }
	if err := json.Unmarshal(raw, &gj); err != nil {
		t.Fatal(err)
	}
	for i, p := range gj.Prompts {
		for name, want := range map[string][]int64{"prompt_": p, "greedy_": gj.Greedy[i]} {
			name += string(rune('0' + i))
			tn, err := f.TensorAs(name, I64, int64(len(want)))
			if err != nil {
				t.Fatal(err)
			}
			got, err := tn.Int64()
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, want) {
				t.Errorf("%s = %v, golden.json has %v", name, got, want)
			}
		}
	}
	logits, err := f.TensorAs("logits_0", F32, 1, 1024)
	if err != nil {
		t.Fatal(err)
	}
	lv, _ := logits.Float32()
	if want := []float32{0.28652825951576233, -0.33129531145095825, 0.945138156414032, 1.2920458316802979}; !slices.Equal(lv[:4], want) {
		t.Errorf("logits_0 starts %v, want %v", lv[:4], want)
	}
	if _, err := logits.Int64(); err == nil {
		t.Error("Int64 of an F32 tensor succeeded")
	}
}

// copyFixture copies the tiny model's shards and index into a temp dir.
func copyFixture(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	ents, err := os.ReadDir(tinyModel)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(tinyModel, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(dir, e.Name()), b)
	}
	return dir
}

func TestOpenDirRejectsBadCheckpoints(t *testing.T) {
	const shard2 = "model-00002-of-00002.safetensors"
	tests := []struct {
		name    string
		breakIt func(t *testing.T, dir string)
		want    []string
	}{
		{"missing shard", func(t *testing.T, dir string) {
			os.Remove(filepath.Join(dir, shard2))
		}, []string{shard2, "is missing"}},
		{"index maps to shard without tensor", func(t *testing.T, dir string) {
			editIndex(t, dir, func(wm map[string]string) { wm["model.norm.weight"] = "model-00001-of-00002.safetensors" })
		}, []string{"model.norm.weight", "does not contain it"}},
		{"index names a ghost tensor", func(t *testing.T, dir string) {
			editIndex(t, dir, func(wm map[string]string) { wm["ghost.weight"] = shard2 })
		}, []string{"ghost.weight", shard2}},
		{"index escapes directory", func(t *testing.T, dir string) {
			editIndex(t, dir, func(wm map[string]string) { wm["lm_head.weight"] = "../x.safetensors" })
		}, []string{"outside the checkpoint directory"}},
		{"malformed index", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, IndexFile), []byte(`{"weight_map": [`))
		}, []string{IndexFile, "malformed index JSON"}},
		{"empty index", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, IndexFile), []byte(`{"weight_map": {}}`))
		}, []string{"no weight_map entries"}},
		{"truncated shard", func(t *testing.T, dir string) {
			p := filepath.Join(dir, shard2)
			st, _ := os.Stat(p)
			os.Truncate(p, st.Size()-1)
		}, []string{shard2, "truncated"}},
		{"no files", func(t *testing.T, dir string) {
			ents, _ := os.ReadDir(dir)
			for _, e := range ents {
				os.Remove(filepath.Join(dir, e.Name()))
			}
		}, []string{"no " + IndexFile}},
		{"same tensor in two files without index", func(t *testing.T, dir string) {
			os.Remove(filepath.Join(dir, IndexFile))
			b, _ := os.ReadFile(filepath.Join(dir, shard2))
			writeFile(t, filepath.Join(dir, "copy.safetensors"), b)
		}, []string{"is in both", shard2, "copy.safetensors"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := copyFixture(t)
			tc.breakIt(t, dir)
			c, err := OpenDir(dir)
			if err == nil {
				c.Close()
				t.Fatal("OpenDir succeeded")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
	if _, err := OpenDir(filepath.Join(t.TempDir(), "nope")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing dir: %v", err)
	}
}

func editIndex(t *testing.T, dir string, edit func(map[string]string)) {
	t.Helper()
	p := filepath.Join(dir, IndexFile)
	raw, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var idx indexJSON
	if err := json.Unmarshal(raw, &idx); err != nil {
		t.Fatal(err)
	}
	edit(idx.WeightMap)
	out, _ := json.Marshal(idx)
	writeFile(t, p, out)
}

func TestOpenDirWithoutIndex(t *testing.T) {
	dir := copyFixture(t)
	os.Remove(filepath.Join(dir, IndexFile))
	c, err := OpenDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if n := len(c.Names()); n != 173 || len(c.Files()) != 2 {
		t.Errorf("%d tensors in %d files, want 173 in 2", n, len(c.Files()))
	}
	// A shard changed on disk after open is caught when it is mapped.
	os.Truncate(filepath.Join(dir, "model-00002-of-00002.safetensors"), 100)
	if _, err := c.Tensor("model.norm.weight"); err == nil || !strings.Contains(err.Error(), "changed size") {
		t.Errorf("changed shard: %v", err)
	}
}

// FuzzParseHeader feeds arbitrary bytes to the header parser as a whole file:
// it must return a header or an error, never panic, and an accepted header
// must describe tensors inside the file.
func FuzzParseHeader(f *testing.F) {
	f.Add(rawFile(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`, 8))
	f.Add(rawFile(`{"__metadata__":{"k":"v"},"b":{"dtype":"BF16","shape":[1,1],"data_offsets":[0,2]}}`, 2))
	f.Add(rawFile(`{}`, 0))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := readHeader("fuzz", strings.NewReader(string(b)), int64(len(b)))
		if err != nil {
			return
		}
		for _, e := range h.tensors {
			if h.dataStart+e.end > int64(len(b)) || e.end-e.begin != e.info.ByteSize() {
				t.Fatalf("accepted tensor %v at [%d, %d) outside a %d-byte file", e.info, e.begin, e.end, len(b))
			}
		}
	})
}

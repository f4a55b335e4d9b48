package model

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/glmtopo/glmtopo/model/safetensors"
)

func TestSynthesizeLayoutAndDeterminism(t *testing.T) {
	for _, dt := range []string{"bf16", "fp8", "fp8-block"} {
		t.Run(dt, func(t *testing.T) {
			cfg, _ := Preset("tiny")
			a, b := t.TempDir(), t.TempDir()
			opt := SynthOptions{Seed: 3, DType: dt, ShardBytes: 1 << 20, Tokenizer: TinyTokenizerJSON()}
			got, err := Synthesize(context.Background(), cfg, a, opt)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := Synthesize(context.Background(), cfg, b, opt); err != nil {
				t.Fatal(err)
			}
			ck, err := safetensors.OpenDir(a)
			if err != nil {
				t.Fatal(err)
			}
			defer ck.Close()
			specs := got.Tensors()
			if len(ck.Names()) != len(specs) {
				t.Fatalf("checkpoint has %d tensors, config lists %d", len(ck.Names()), len(specs))
			}
			for _, s := range specs {
				info, ok := ck.Info(s.Name)
				if !ok {
					t.Fatalf("missing %s", s.Name)
				}
				if string(info.DType) != string(s.DType) || !slices.Equal(info.Shape, s.Shape) {
					t.Errorf("%s: %s%v, want %s%v", s.Name, info.DType, info.Shape, s.DType, s.Shape)
				}
			}
			shards, _ := filepath.Glob(filepath.Join(a, "model-*.safetensors"))
			if len(shards) < 2 {
				t.Errorf("expected several shards of 1 MiB, got %d", len(shards))
			}
			for _, f := range shards {
				x, _ := os.ReadFile(f)
				y, _ := os.ReadFile(filepath.Join(b, filepath.Base(f)))
				if !bytes.Equal(x, y) {
					t.Errorf("%s differs between two runs with the same seed", filepath.Base(f))
				}
			}
			if (got.Quantization != nil) != (dt != "bf16") {
				t.Errorf("quantization %+v for %s", got.Quantization, dt)
			}
		})
	}
}

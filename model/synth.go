package model

import (
	"context"
	_ "embed"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"sync"

	"github.com/glmtopo/glmtopo/model/safetensors"
)

// tinyTokenizer is a byte-level BPE (1024 ids) with GLM-4.5's pre-tokenizer and
// special tokens at 1003..1023: the tokenizer of the embedded tiny model.
//
//go:embed assets/tiny_tokenizer.json
var tinyTokenizer []byte

// TinyTokenizerJSON returns the tokenizer.json written with the tiny preset.
func TinyTokenizerJSON() []byte { return append([]byte(nil), tinyTokenizer...) }

// SynthOptions control a synthetic checkpoint.
type SynthOptions struct {
	Seed       uint64
	DType      string // "bf16" (default), "fp8" (per-channel, as zai-org's FP8 checkpoints) or "fp8-block" (128×128)
	ShardBytes int64  // target shard size (default 4 GiB)
	Tokenizer  []byte // tokenizer.json to write beside the weights (nil: none)
	Progress   Progress
}

// Synthesize writes a random-weight checkpoint of cfg to dir in the published
// layout: config.json, model-0000i-of-0000n.safetensors shards with
// model.safetensors.index.json, one tensor per expert, the MTP layer, and FP8
// scales when quantized. Values depend only on (seed, tensor name), and data
// streams to disk in chunks, so a full-size GLM-4.5 never sits in memory.
func Synthesize(ctx context.Context, cfg *Config, dir string, opt SynthOptions) (*Config, error) {
	c := cfg.Clone()
	switch opt.DType {
	case "", "bf16":
		c.Quantization = nil
	case "fp8":
		c.Quantization = FP8PerChannel()
	case "fp8-block":
		c.Quantization = FP8Block()
	default:
		return nil, fmt.Errorf("synth: dtype %q (want bf16, fp8 or fp8-block)", opt.DType)
	}
	if opt.ShardBytes <= 0 {
		opt.ShardBytes = 4 << 30
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("synth: %w", err)
	}
	specs := c.Tensors()
	// Pack tensors into shards in list order.
	var shards [][]TensorSpec
	var size, total int64
	for _, t := range specs {
		if len(shards) == 0 || size+t.Bytes() > opt.ShardBytes && size > 0 {
			shards = append(shards, nil)
			size = 0
		}
		shards[len(shards)-1] = append(shards[len(shards)-1], t)
		size += t.Bytes()
		total += t.Bytes()
	}
	g := &synthGen{c: c, seed: opt.Seed, progress: opt.Progress, total: total, byName: map[string]TensorSpec{}}
	for _, t := range specs {
		g.byName[t.Name] = t
	}
	weightMap := map[string]string{}
	for i, shard := range shards {
		name := fmt.Sprintf("model-%05d-of-%05d.safetensors", i+1, len(shards))
		if err := g.writeShard(ctx, filepath.Join(dir, name), shard); err != nil {
			return nil, err
		}
		for _, t := range shard {
			weightMap[t.Name] = name
		}
	}
	if err := safetensors.WriteIndex(dir, weightMap, total); err != nil {
		return nil, fmt.Errorf("synth: %w", err)
	}
	data, err := c.marshal()
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), data, 0o644); err != nil {
		return nil, fmt.Errorf("synth: %w", err)
	}
	if opt.Tokenizer != nil {
		if err := os.WriteFile(filepath.Join(dir, "tokenizer.json"), opt.Tokenizer, 0o644); err != nil {
			return nil, fmt.Errorf("synth: %w", err)
		}
		tc, _ := json.MarshalIndent(map[string]any{"tokenizer_class": "PreTrainedTokenizerFast",
			"model_max_length": c.MaxPositionEmbeddings, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, "", "  ")
		if err := os.WriteFile(filepath.Join(dir, "tokenizer_config.json"), tc, 0o644); err != nil {
			return nil, fmt.Errorf("synth: %w", err)
		}
	}
	return LoadConfig(dir)
}

type synthGen struct {
	c        *Config
	seed     uint64
	progress Progress
	done     int64
	total    int64
	byName   map[string]TensorSpec
}

func (g *synthGen) writeShard(ctx context.Context, path string, shard []TensorSpec) error {
	infos := make([]safetensors.TensorInfo, len(shard))
	for i, t := range shard {
		infos[i] = safetensors.TensorInfo{Name: t.Name, DType: safetensors.DType(t.DType), Shape: t.Shape}
	}
	w, err := safetensors.NewWriter(path, infos, map[string]string{"format": "pt"})
	if err != nil {
		return fmt.Errorf("synth: %w", err)
	}
	for _, t := range shard {
		if err := ctx.Err(); err != nil {
			w.Abort()
			return err
		}
		if err := w.WriteTensor(t.Name, func(dst io.Writer) error { return g.fill(dst, t) }); err != nil {
			w.Abort()
			return fmt.Errorf("synth %s: %w", t.Name, err)
		}
		g.done += t.Bytes()
		if g.progress != nil {
			g.progress(g.done, g.total)
		}
	}
	if err := w.Close(); err != nil {
		return fmt.Errorf("synth: %w", err)
	}
	return nil
}

// dist is the distribution of a tensor's values: uniform in mean ± half.
func (g *synthGen) dist(t TensorSpec) (mean, half float64) {
	switch {
	case t.ScaleOf != "":
		return 0, 0
	case len(t.Shape) == 1 && (t.Role == RoleRouter):
		return 0, 0.05 // correction bias: small, non-zero
	case len(t.Shape) == 1 && t.Shape[0] != int64(g.c.HiddenSize) && t.Shape[0] != int64(g.c.HeadDim):
		return 0, 0.02 // projection biases
	case len(t.Shape) == 1:
		return 1, 0.1 // norm weights around 1
	case t.Role == RoleEmbedding || isEmbedding(t.Name):
		return 0, math.Sqrt(3) // unit variance
	}
	return 0, math.Sqrt(3) / math.Sqrt(float64(t.Shape[1])) // variance 1/fan_in
}

func isEmbedding(name string) bool {
	return len(name) >= len("embed_tokens.weight") && name[len(name)-len("embed_tokens.weight"):] == "embed_tokens.weight"
}

// fp8Scale is the per-channel (or per-block) scale of a synthetic FP8 weight:
// the uniform range maps to ±448·(7/8), so values use e4m3's whole range.
func fp8Scale(half float64) float32 { return float32(half / (448 * 7 / 8)) }

const synthChunk = 1 << 20 // elements generated per chunk

// fill streams tensor t's bytes: chunks are generated in parallel from
// (seed, name, chunk index) and written in order.
func (g *synthGen) fill(dst io.Writer, t TensorSpec) error {
	if t.ScaleOf != "" {
		_, half := g.dist(g.byName[t.ScaleOf])
		buf := make([]byte, 4*t.Elements())
		s := make([]float32, t.Elements())
		for i := range s {
			s[i] = fp8Scale(half)
		}
		safetensors.F32ToBytes(buf, s)
		_, err := dst.Write(buf)
		return err
	}
	mean, half := g.dist(t)
	n := t.Elements()
	chunks := int((n + synthChunk - 1) / synthChunk)
	h := fnv.New64a()
	h.Write([]byte(t.Name))
	base := h.Sum64() ^ g.seed*0x9e3779b97f4a7c15
	workers := runtime.GOMAXPROCS(0)
	scale := fp8Scale(half)
	for c0 := 0; c0 < chunks; c0 += workers {
		c1 := min(c0+workers, chunks)
		out := make([][]byte, c1-c0)
		var wg sync.WaitGroup
		for c := c0; c < c1; c++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				lo := int64(c) * synthChunk
				m := int(min(synthChunk, n-lo))
				vals := make([]float32, m)
				rng := splitmix{base + uint64(c)*0xbf58476d1ce4e5b9}
				for i := range vals {
					vals[i] = float32(mean + half*(2*rng.float64()-1))
				}
				var b []byte
				switch t.DType {
				case F32:
					b = make([]byte, 4*m)
					safetensors.F32ToBytes(b, vals)
				case BF16:
					b = make([]byte, 2*m)
					safetensors.F32ToBF16Bytes(b, vals)
				case F8E4M3:
					for i := range vals {
						vals[i] /= scale
					}
					b = make([]byte, m)
					safetensors.F32ToE4M3Bytes(b, vals)
				}
				out[c-c0] = b
			}()
		}
		wg.Wait()
		for _, b := range out {
			if _, err := dst.Write(b); err != nil {
				return err
			}
		}
	}
	return nil
}

// splitmix is SplitMix64: fast, and good enough for synthetic weights.
type splitmix struct{ s uint64 }

func (r *splitmix) next() uint64 {
	r.s += 0x9e3779b97f4a7c15
	z := r.s
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

func (r *splitmix) float64() float64 { return float64(r.next()>>11) / (1 << 53) }

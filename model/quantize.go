package model

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/glmtopo/glmtopo/model/safetensors"
)

// QuantizeCheckpoint writes a copy of the bf16 checkpoint in src to dst with
// every linear weight that q quantizes stored as e4m3 with its scales
// (per output channel, or 128×128 blocks), the rest unchanged, and q as the
// config's quantization_config. It holds one tensor in memory at a time.
func QuantizeCheckpoint(ctx context.Context, src, dst string, q *Quantization) (*Config, error) {
	cfg, err := LoadConfig(src)
	if err != nil {
		return nil, err
	}
	if cfg.Quantization != nil {
		return nil, fmt.Errorf("quantize %s: the checkpoint is already quantized (%s)", src, cfg.Quantization.Scheme)
	}
	in, err := safetensors.OpenDir(src)
	if err != nil {
		return nil, fmt.Errorf("quantize: %w", err)
	}
	defer in.Close()
	out := cfg.Clone()
	out.Quantization = q
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return nil, fmt.Errorf("quantize: %w", err)
	}
	specs := out.Tensors()
	infos := make([]safetensors.TensorInfo, len(specs))
	for i, s := range specs {
		infos[i] = safetensors.TensorInfo{Name: s.Name, DType: safetensors.DType(s.DType), Shape: s.Shape}
	}
	const file = "model.safetensors"
	w, err := safetensors.NewWriter(filepath.Join(dst, file), infos, map[string]string{"format": "pt"})
	if err != nil {
		return nil, fmt.Errorf("quantize: %w", err)
	}
	// Scales are computed with their weights and written when the scale's turn comes.
	scales := map[string][]float32{}
	weightMap := map[string]string{}
	var total int64
	for _, s := range specs {
		if err := ctx.Err(); err != nil {
			w.Abort()
			return nil, err
		}
		weightMap[s.Name] = file
		total += s.Bytes()
		if s.ScaleOf != "" {
			continue
		}
		t, err := in.Tensor(s.Name)
		if err != nil {
			w.Abort()
			return nil, fmt.Errorf("quantize: %w", err)
		}
		var data []byte
		switch s.DType {
		case F8E4M3:
			v, err := t.Float32()
			if err != nil {
				w.Abort()
				return nil, err
			}
			rows, cols := int(s.Shape[0]), int(s.Shape[1])
			var qb []byte
			var sc []float32
			if q.Scheme == QuantPerChannel {
				qb, sc, err = safetensors.QuantizePerChannelE4M3(v, rows, cols)
			} else {
				qb, sc, err = safetensors.QuantizeBlockE4M3(v, rows, cols, q.BlockSize[0])
			}
			if err != nil {
				w.Abort()
				return nil, fmt.Errorf("quantize %s: %w", s.Name, err)
			}
			data = qb
			scales[s.Name] = sc
		default:
			if string(t.DType) != string(s.DType) {
				w.Abort()
				return nil, fmt.Errorf("quantize: %s is %s, expected %s", s.Name, t.DType, s.DType)
			}
			data = t.Data
		}
		if err := w.Write(s.Name, data); err != nil {
			w.Abort()
			return nil, fmt.Errorf("quantize: %w", err)
		}
	}
	for _, s := range specs {
		if s.ScaleOf == "" {
			continue
		}
		b := make([]byte, 4*len(scales[s.ScaleOf]))
		safetensors.F32ToBytes(b, scales[s.ScaleOf])
		if err := w.Write(s.Name, b); err != nil {
			w.Abort()
			return nil, fmt.Errorf("quantize: %w", err)
		}
	}
	if err := w.Close(); err != nil {
		return nil, fmt.Errorf("quantize: %w", err)
	}
	if err := safetensors.WriteIndex(dst, weightMap, total); err != nil {
		return nil, fmt.Errorf("quantize: %w", err)
	}
	data, err := out.marshal()
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dst, "config.json"), data, 0o644); err != nil {
		return nil, fmt.Errorf("quantize: %w", err)
	}
	return LoadConfig(dst)
}

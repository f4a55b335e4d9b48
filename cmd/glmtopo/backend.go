package main

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/kernels/cuda"
)

// openBackend opens "cpu" or "cuda[:N]" and says which KV cache dtype it takes.
func openBackend(device string) (kernels.Backend, kernels.DType, error) {
	switch {
	case device == "cpu":
		return cpu.New(0), kernels.F32, nil
	case device == "cuda" || strings.HasPrefix(device, "cuda:"):
		n := 0
		if _, idx, ok := strings.Cut(device, ":"); ok {
			v, err := strconv.Atoi(idx)
			if err != nil || v < 0 {
				return nil, 0, fmt.Errorf("--device %q: want cuda:N", device)
			}
			n = v
		}
		be, err := cuda.New(cuda.Options{Device: n})
		if err != nil {
			return nil, 0, err
		}
		return be, kernels.BF16, nil
	}
	return nil, 0, fmt.Errorf("--device %q: want cpu, cuda or cuda:N", device)
}

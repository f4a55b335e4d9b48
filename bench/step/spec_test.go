package step

import (
	"bytes"
	"context"
	"math"
	"strings"
	"testing"
)

func TestTokensPerStep(t *testing.T) {
	for _, tc := range []struct {
		a    float64
		n    int
		want float64
	}{
		{0.9, 1, 1.9}, {0.8, 2, 1 + 0.8 + 0.64}, {0.6, 3, 1 + 0.6 + 0.36 + 0.216}, {0, 4, 1}, {1, 4, 5},
	} {
		if got := TokensPerStep(tc.a, tc.n); math.Abs(got-tc.want) > 1e-12 {
			t.Errorf("TokensPerStep(%g, %d) = %g, want %g", tc.a, tc.n, got, tc.want)
		}
	}
}

func TestSpeculativeTokensFlag(t *testing.T) {
	for _, n := range []string{"-1", "5"} {
		var out, errb bytes.Buffer
		err := Run(context.Background(), []string{"--speculative-tokens", n}, &out, &errb)
		if err == nil || !strings.Contains(err.Error(), "--speculative-tokens "+n) {
			t.Errorf("--speculative-tokens %s: %v", n, err)
		}
	}
}

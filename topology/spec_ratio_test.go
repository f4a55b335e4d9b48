package topology

import (
	"math"
	"testing"
)

// A measured speculative step ratio replaces the modelled verify cost:
// throughput with MTP = throughput without × tokens per step / ratio, and
// a ratio above tokens per step makes MTP a loss.
func TestMTPStepRatio(t *testing.T) {
	modelled, err := Plan(airRequest(t, "1x4xH100-80G"))
	if err != nil || !modelled.Feasible {
		t.Fatalf("%v %v", err, modelled)
	}
	for _, ratio := range []float64{1.2, 2.5} {
		req := airRequest(t, "1x4xH100-80G")
		req.MTPStepRatio = ratio
		res, err := Plan(req)
		if err != nil || !res.Feasible {
			t.Fatalf("%v %v", err, res)
		}
		p := res.Predicted
		want := p.NoMTPDecodeTokensPerS * p.TokensPerStep / ratio
		if math.Abs(p.DecodeTokensPerS-want) > 1e-9*want || p.NoMTPDecodeTokensPerS != modelled.Predicted.NoMTPDecodeTokensPerS {
			t.Errorf("ratio %g: %.1f tok/s with MTP, want %.1f (%.1f without, %.2f tokens/step)", ratio, p.DecodeTokensPerS, want,
				p.NoMTPDecodeTokensPerS, p.TokensPerStep)
		}
		if gain := p.DecodeTokensPerS > p.NoMTPDecodeTokensPerS; gain != (ratio < p.TokensPerStep) {
			t.Errorf("ratio %g at %.2f tokens/step: MTP %.0f vs none %.0f tok/s", ratio, p.TokensPerStep, p.DecodeTokensPerS, p.NoMTPDecodeTokensPerS)
		}
		if tpot := p.StepMs / p.TokensPerStep; math.Abs(p.TPOTMs-tpot) > 1e-9*tpot {
			t.Errorf("ratio %g: TPOT %.3f ms, step %.3f ms / %.2f tokens", ratio, p.TPOTMs, p.StepMs, p.TokensPerStep)
		}
		t.Logf("ratio %g: %.0f tok/s with MTP (modelled %.0f), %.0f without", ratio, p.DecodeTokensPerS,
			modelled.Predicted.DecodeTokensPerS, p.NoMTPDecodeTokensPerS)
	}
	req := airRequest(t, "1x4xH100-80G")
	req.MTPStepRatio = -1
	if _, err := Plan(req); err == nil {
		t.Error("a negative step ratio: no error")
	}
}

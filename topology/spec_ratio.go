package topology

// applyStepRatio replaces the modelled cost of speculation (the verify
// step's extra rows and the MTP layer's draft passes) with a measured one:
// a speculative step lasting ratio plain decode steps, at tau tokens per
// sequence per step, gives the throughput without MTP × tau / ratio. A zero
// ratio (not measured) or an unknown plain throughput leaves the model's.
func (pr *Prediction) applyStepRatio(ratio, tau float64, batch int) {
	if ratio <= 0 || pr.NoMTPDecodeTokensPerS <= 0 {
		return
	}
	pr.DecodeTokensPerS = pr.NoMTPDecodeTokensPerS * tau / ratio
	pr.StepMs = float64(batch) * tau / pr.DecodeTokensPerS * 1e3
	pr.TPOTMs = pr.StepMs / tau
}

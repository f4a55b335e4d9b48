package kernels

// Filler is implemented by backends that fill tensors with generated values
// where they live, without a host copy: dummy weights (vLLM's
// --load-format dummy) for full-size shapes without a checkpoint.
type Filler interface {
	// Fill sets t to values that depend on seed alone: F32 and BF16 uniform
	// in [-scale, scale), F8E4M3 random e4m3 bytes of magnitude ≤ 120
	// (scale unused).
	Fill(t *Tensor, seed uint64, scale float32) error
	// FillConst sets every element of an F32 tensor to v.
	FillConst(t *Tensor, v float32) error
}

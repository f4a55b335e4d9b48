// Package safetensors reads and writes the safetensors checkpoint format and
// converts between the floating-point encodings checkpoints use (BF16, F16,
// F8_E4M3) and float32.
//
// The format is an 8-byte little-endian header length, a JSON header mapping
// tensor names to {dtype, shape, data_offsets} (plus an optional
// "__metadata__" string map), and the tensor bytes, little-endian and
// row-major, packed back to back. Files are memory-mapped read-only; a
// Tensor's Data aliases the mapping and is valid until the File or Checkpoint
// is closed.
//
// The package knows nothing about any model: it is the format layer only.
package safetensors

package cuda

import (
	"encoding/binary"
	"fmt"
	"math"
	"slices"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
)

const (
	// sampleMaxVocab bounds the rows sample_rows takes: 2^18 fixed-point
	// probabilities of at most 2^45 each sum within 64 bits.
	sampleMaxVocab = 1 << 18
	// sampleMaxBans is the most banned ids of one row the kernel holds in
	// shared memory (SAMPLE_MAX_BANS in src/sample.cu).
	sampleMaxBans = 256
	// sampleArgsBytes is the size of src/sample.cu's SampleArgs.
	sampleArgsBytes = 24
)

// Sample picks one token per row. All-greedy batches take the split argmax;
// rows with a temperature, top-k/top-p or banned ids take sample_rows (one
// block per row, src/sample.cu), which draws the token kernels/cpu.SampleRow
// draws from the same U. Rows the kernel cannot take (a vocabulary over
// 2^18, more than 256 bans) and Options.HostSampling go to that CPU sampler.
func (b *Backend) Sample(logits *kernels.Tensor, params []kernels.SampleParams) ([]int32, error) {
	if logits == nil || logits.Rows() != len(params) {
		return nil, fmt.Errorf("cuda: sample: logits rows and %d params differ", len(params))
	}
	if _, err := ptrOf(logits, kernels.F32, "logits"); err != nil {
		return nil, fmt.Errorf("cuda: sample: %w", err)
	}
	greedy, device := true, logits.Cols() <= sampleMaxVocab && !b.opt.HostSampling
	for _, p := range params {
		greedy = greedy && p.Temperature <= 0 && len(p.Ban) == 0
		device = device && len(p.Ban) <= sampleMaxBans
	}
	if len(params) == 0 {
		return nil, nil
	}
	if !greedy && !device {
		lg, err := b.Download(logits)
		if err != nil {
			return nil, err
		}
		return cpu.SampleRows(lg, logits.Cols(), params), nil
	}
	ids, err := b.NewTensor(kernels.I32, len(params))
	if err != nil {
		return nil, err
	}
	defer b.Free(ids)
	if greedy {
		err = b.Argmax(ids, logits)
	} else {
		err = b.sampleRows(ids, logits, params)
	}
	if err != nil {
		return nil, err
	}
	return b.DownloadI32(ids)
}

// sampleArgs packs params as src/sample.cu's SampleArgs, with each row's
// banned ids (those inside the vocabulary, sorted) after them.
func sampleArgs(params []kernels.SampleParams, V int) (args []byte, bans []int32) {
	args = make([]byte, 0, sampleArgsBytes*len(params))
	le := binary.LittleEndian
	for _, p := range params {
		b0 := len(bans)
		for _, id := range p.Ban {
			if id >= 0 && int(id) < V {
				bans = append(bans, id)
			}
		}
		slices.Sort(bans[b0:])
		args = le.AppendUint32(args, math.Float32bits(p.Temperature))
		args = le.AppendUint32(args, math.Float32bits(p.TopP))
		args = le.AppendUint32(args, uint32(int32(min(p.TopK, math.MaxInt32))))
		args = le.AppendUint32(args, math.Float32bits(p.U))
		args = le.AppendUint32(args, uint32(b0))
		args = le.AppendUint32(args, uint32(len(bans)))
	}
	return args, bans
}

func (b *Backend) sampleRows(ids, logits *kernels.Tensor, params []kernels.SampleParams) error {
	R, V := logits.Rows(), logits.Cols()
	args, bans := sampleArgs(params, V)
	nargs := len(args)
	for _, id := range bans {
		args = binary.LittleEndian.AppendUint32(args, uint32(id))
	}
	dev, err := b.NewTensor(kernels.I32, len(args)/4)
	if err != nil {
		return err
	}
	defer b.Free(dev)
	if err := b.Upload(dev, args); err != nil {
		return fmt.Errorf("cuda: sample: %w", err)
	}
	var ta tensorArgs
	op := ta.ptr(ids, kernels.I32, "sample output")
	lp := ta.ptr(logits, kernels.F32, "logits")
	ap := ta.ptr(dev, kernels.I32, "sample args")
	if ta.err != nil {
		return ta.err
	}
	return b.op(func() error {
		return b.launch("ops", "sample_rows", rows(R), b1024, 0, op, lp, int32(V), ap, ap+uintptr(nargs))
	})
}

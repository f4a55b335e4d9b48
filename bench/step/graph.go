package step

import (
	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
)

// timeGraph captures a decode step of bt and times its replays.
func (b *bench) timeGraph(bt *kernels.Batch, iters int) (float64, error) {
	g, done, err := b.captureDecode(bt, 1)
	if err != nil {
		return 0, err
	}
	defer done()
	tm, err := b.be.NewTimer()
	if err != nil {
		return 0, err
	}
	defer tm.Close()
	sec, err := tm.Median(2, iters, g[0].Launch)
	if err != nil {
		return 0, err
	}
	return sec, b.be.Sync()
}

// captureDecode captures n decode steps of bt as graphs, the i-th through
// comms[i] (nil or missing: no communicator), over the same ids and
// outputs; done frees them and their tensors.
func (b *bench) captureDecode(bt *kernels.Batch, n int, comms ...*model.RankComm) (graphs []kernels.Graph, done func(), err error) {
	be := b.be
	T := bt.Tokens()
	var forwards []*model.Forward
	var meta kernels.BatchMeta
	done = func() {
		for _, g := range graphs {
			g.Close()
		}
		for _, f := range forwards {
			if f != nil {
				f.Release()
			}
		}
		if meta != nil {
			be.FreeBatchMeta(meta)
		}
		for _, t := range b.graphTemps {
			be.Free(t)
		}
		b.graphTemps = nil
		b.ranks = nil
	}
	fail := func(err error) ([]kernels.Graph, func(), error) {
		done()
		return nil, nil, err
	}
	ids, err := be.NewTensor(kernels.I32, T)
	if err != nil {
		return fail(err)
	}
	b.graphTemps = append(b.graphTemps, ids)
	out, err := be.NewTensor(kernels.I32, T)
	if err != nil {
		return fail(err)
	}
	b.graphTemps = append(b.graphTemps, out)
	raw := make([]byte, 4*T)
	for i := 0; i < T; i++ {
		v := uint32(b.rng.IntN(b.cfg.VocabSize))
		raw[4*i], raw[4*i+1], raw[4*i+2], raw[4*i+3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
	}
	if err := be.Upload(ids, raw); err != nil {
		return fail(err)
	}
	if meta, err = be.NewBatchMeta(bt); err != nil {
		return fail(err)
	}
	for i := range n {
		b.ranks = nil
		if i < len(comms) {
			b.ranks = comms[i]
		}
		warm, err := b.graphStep(meta, ids, out) // compiles, uploads expert tables
		forwards = append(forwards, warm)
		if err != nil {
			return fail(err)
		}
		if err := be.BeginCapture(); err != nil {
			return fail(err)
		}
		f, err := b.graphStep(meta, ids, out)
		forwards = append(forwards, f)
		g, cerr := be.EndCapture() // ends the capture even after a failed step
		if err != nil {
			if cerr == nil {
				g.Close()
			}
			return fail(err)
		}
		if cerr != nil {
			return fail(cerr)
		}
		graphs = append(graphs, g)
	}
	b.ranks = nil
	return graphs, done, nil
}

package cuda

import (
	"fmt"
	"unsafe"

	"github.com/glmtopo/glmtopo/kernels"
)

var (
	_ kernels.GraphCapturer = (*Backend)(nil)
	_ kernels.BatchUpdater  = (*Backend)(nil)
	_ kernels.GraphBatcher  = (*Backend)(nil)
)

// cuStreamCaptureModeRelaxed lets other threads make unrelated CUDA calls
// (and this one allocate) while the stream is captured.
const cuStreamCaptureModeRelaxed = 2

// BeginCapture starts recording the stream. Warm the operations up first:
// kernels are compiled and expert tables uploaded on first use, and wide
// MoE batches (which read their plan back) are never captured.
func (b *Backend) BeginCapture() error {
	if b.capturing {
		return fmt.Errorf("cuda: capture already in progress")
	}
	if b.RouteObserver != nil {
		return fmt.Errorf("cuda: cannot capture while a RouteObserver is set (it reads ids back)")
	}
	return b.op(func() error {
		if err := b.d.check(b.d.cuStreamBeginCapture(b.stream, cuStreamCaptureModeRelaxed), "cuStreamBeginCapture"); err != nil {
			return err
		}
		b.capturing = true
		b.pool.capturing = true
		return nil
	})
}

// graph is an instantiated CUDA graph bound to its backend's stream.
type graph struct {
	b       *Backend
	g, exec uintptr
}

// EndCapture stops recording and instantiates the graph.
func (b *Backend) EndCapture() (kernels.Graph, error) {
	if !b.capturing {
		return nil, fmt.Errorf("cuda: no capture in progress")
	}
	g := &graph{b: b}
	err := b.op(func() error {
		b.capturing = false
		b.pool.capturing = false
		if err := b.d.check(b.d.cuStreamEndCapture(b.stream, &g.g), "cuStreamEndCapture"); err != nil {
			return err
		}
		return b.d.check(b.d.cuGraphInstantiate(&g.exec, g.g, 0), "cuGraphInstantiate")
	})
	if err != nil {
		if g.g != 0 {
			b.d.cuGraphDestroy(g.g)
		}
		return nil, err
	}
	return g, nil
}

func (g *graph) Launch() error {
	return g.b.op(func() error {
		r, _, _ := syscallN(g.b.d.graphLaunch, g.exec, g.b.stream)
		return g.b.d.check(int32(r), "cuGraphLaunch")
	})
}

func (g *graph) Close() error {
	return g.b.op(func() error {
		if g.exec != 0 {
			g.b.d.cuGraphExecDestroy(g.exec)
			g.exec = 0
		}
		if g.g != 0 {
			g.b.d.cuGraphDestroy(g.g)
			g.g = 0
		}
		return nil
	})
}

// UpdateBatch rewrites an uploaded batch in place (see kernels.BatchUpdater).
func (b *Backend) UpdateBatch(meta kernels.BatchMeta, batch *kernels.Batch) error {
	m, ok := meta.(*batchMeta)
	if !ok {
		return fmt.Errorf("cuda: foreign batch metadata %T", meta)
	}
	T, S := batch.Tokens(), len(batch.BlockTables)
	if T != m.T || S != len(m.b.BlockTables) || len(batch.SeqIndex) != T || len(batch.Slots) != T || len(batch.ContextLens) != S {
		return fmt.Errorf("cuda: update batch: %d tokens in %d sequences, metadata holds %d in %d", T, S, m.T, len(m.b.BlockTables))
	}
	tiles := prefillTiles(batch)
	if len(tiles)/2 != m.nTiles {
		return fmt.Errorf("cuda: update batch: %d prefill tiles, metadata holds %d", len(tiles)/2, m.nTiles)
	}
	host := make([]int32, 3*T+S*m.stride+len(tiles))
	copy(host[m.tileOff:], tiles)
	copy(host, batch.Positions)
	copy(host[T:], batch.SeqIndex)
	copy(host[2*T:], batch.Slots)
	for i, t := range batch.BlockTables {
		if len(t) > m.stride || int(batch.ContextLens[i]) > m.maxCtx {
			return fmt.Errorf("cuda: update batch: sequence %d has %d blocks and %d tokens, metadata allows %d and %d", i, len(t), batch.ContextLens[i], m.stride, m.maxCtx)
		}
		copy(host[3*T+i*m.stride:], t)
	}
	if b.capturing {
		return fmt.Errorf("cuda: batch update during graph capture")
	}
	return b.op(func() error {
		return b.d.check(b.d.cuMemcpyHtoDAsync(m.dev, unsafe.Pointer(&host[0]), uintptr(4*len(host)), b.stream), "update batch")
	})
}

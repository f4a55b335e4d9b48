package parallel

import (
	"errors"
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"
)

// ErrOutOfBlocks means the paged KV cache has no free block left.
var ErrOutOfBlocks = errors.New("kv cache: out of blocks")

// KVPool is a paged KV cache: every layer has K and V tensors of NumBlocks
// blocks of BlockSize tokens, and sequences own lists of block ids.
type KVPool struct {
	BlockSize int
	NumBlocks int
	Layers    []*kernels.KVCache // one per layer this stage runs (the MTP layer last, if any)
	free      []int32
	be        kernels.Backend
	// released, when set, hears of every sequence's blocks as they return
	// to the pool (a pipeline head's ring announces them to its stages).
	released func(blocks []int32)
}

// NewKVPool allocates numBlocks blocks for layers layers, elements of dtype dt
// (F32 or F8E4M3 on the CPU; BF16 or F8E4M3, vLLM's --kv-cache-dtype fp8, on CUDA).
func NewKVPool(be kernels.Backend, dt kernels.DType, layers, numBlocks, blockSize, kvHeads, headDim int) (*KVPool, error) {
	if numBlocks <= 0 || blockSize <= 0 {
		return nil, fmt.Errorf("kv cache: %d blocks of %d tokens", numBlocks, blockSize)
	}
	p := &KVPool{BlockSize: blockSize, NumBlocks: numBlocks, be: be}
	for range layers {
		k, err := be.NewTensor(dt, numBlocks*blockSize, kvHeads, headDim)
		if err != nil {
			p.Close()
			return nil, fmt.Errorf("kv cache: %w", err)
		}
		v, err := be.NewTensor(dt, numBlocks*blockSize, kvHeads, headDim)
		if err != nil {
			be.Free(k)
			p.Close()
			return nil, fmt.Errorf("kv cache: %w", err)
		}
		p.Layers = append(p.Layers, &kernels.KVCache{K: k, V: v, BlockSize: blockSize, KVHeads: kvHeads, HeadDim: headDim})
	}
	for b := numBlocks - 1; b >= 0; b-- {
		p.free = append(p.free, int32(b))
	}
	return p, nil
}

// Close frees the cache tensors.
func (p *KVPool) Close() {
	for _, l := range p.Layers {
		p.be.Free(l.K)
		p.be.Free(l.V)
	}
	p.Layers = nil
}

// FreeBlocks is the number of unallocated blocks.
func (p *KVPool) FreeBlocks() int { return len(p.free) }

// BlocksFor is the number of blocks a sequence of n tokens needs.
func (p *KVPool) BlocksFor(n int) int { return (n + p.BlockSize - 1) / p.BlockSize }

// Seq is one sequence's place in the cache.
type Seq struct {
	Blocks []int32
	Len    int // tokens whose K/V are in the main layers' caches
	MTPLen int // tokens whose K/V are in the MTP layer's cache
}

// Reserve makes room for positions [0, n) in s.
func (p *KVPool) Reserve(s *Seq, n int) error {
	need := p.BlocksFor(n) - len(s.Blocks)
	if need > len(p.free) {
		return fmt.Errorf("%w: need %d, %d free", ErrOutOfBlocks, need, len(p.free))
	}
	for range need {
		b := p.free[len(p.free)-1]
		p.free = p.free[:len(p.free)-1]
		s.Blocks = append(s.Blocks, b)
	}
	return nil
}

// Release returns s's blocks to the pool.
func (p *KVPool) Release(s *Seq) {
	if p.released != nil && len(s.Blocks) > 0 {
		p.released(s.Blocks)
	}
	for i := len(s.Blocks) - 1; i >= 0; i-- {
		p.free = append(p.free, s.Blocks[i])
	}
	s.Blocks, s.Len, s.MTPLen = nil, 0, 0
}

// takeScratch removes a free block from the pool for good (NumBlocks drops
// by one): decode graphs point their padding rows at it.
func (p *KVPool) takeScratch() int32 {
	b := p.free[len(p.free)-1]
	p.free = p.free[:len(p.free)-1]
	p.NumBlocks--
	return b
}

// slot is the cache slot of position pos of s.
func (p *KVPool) slot(s *Seq, pos int) int32 {
	return s.Blocks[pos/p.BlockSize]*int32(p.BlockSize) + int32(pos%p.BlockSize)
}

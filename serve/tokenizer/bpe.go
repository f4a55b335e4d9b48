package tokenizer

import (
	"strings"
	"sync"
	"sync/atomic"
)

// merge is one BPE merge rule: the pair's priority (lower merges first) and
// the id of the merged token.
type merge struct {
	rank  int32
	newID int32
}

func pairKey(a, b int32) uint64 { return uint64(uint32(a))<<32 | uint64(uint32(b)) }

// bpe is a byte-level BPE model with Hugging Face's merge semantics: of all
// adjacent pairs that have a merge rule, the lowest-ranked one merges first,
// the leftmost on ties. Only listed merges apply (unlike tiktoken, which merges
// any pair whose concatenation is a token).
type bpe struct {
	merges       map[uint64]merge
	byteID       [256]int32 // id of each single-byte token, -1 if absent
	unkID        int32      // -1 if no unk token
	fuseUnk      bool
	ignoreMerges bool
	vocab        map[string]int // byte-level token text → id, added tokens excluded
	bl           *byteLevel

	cache pieceCache
}

// Pieces longer than this are not cached: they are rare and would let one
// adversarial request fill the cache.
const (
	maxCachedPiece = 64
	maxCacheItems  = 1 << 17
	cacheShards    = 32
)

// pieceCache maps raw pieces to their ids. It is sharded so that concurrent
// encoders rarely touch the same lock, and stops growing at maxCacheItems (as
// Hugging Face's BPE cache does) so memory stays bounded.
type pieceCache struct {
	shards [cacheShards]struct {
		mu sync.RWMutex
		m  map[string][]int32
		_  [40]byte // keep shards on separate cache lines
	}
	items atomic.Int64
}

func shardOf(piece string) int {
	h := uint32(len(piece)) * 0x9E3779B1
	for i := 0; i < len(piece) && i < 8; i++ {
		h = (h ^ uint32(piece[i])) * 0x01000193
	}
	h ^= uint32(piece[len(piece)-1]) * 0x85EBCA6B
	return int(h>>16) % cacheShards
}

func (c *pieceCache) get(piece string) ([]int32, bool) {
	s := &c.shards[shardOf(piece)]
	s.mu.RLock()
	ids, ok := s.m[piece]
	s.mu.RUnlock()
	return ids, ok
}

func (c *pieceCache) put(piece string, ids []int32) {
	if c.items.Load() >= maxCacheItems {
		return
	}
	s := &c.shards[shardOf(piece)]
	s.mu.Lock()
	if s.m == nil {
		s.m = make(map[string][]int32)
	}
	if _, ok := s.m[piece]; !ok {
		// Clone: piece points into the caller's text, which the cache must
		// not keep alive.
		s.m[strings.Clone(piece)] = ids
		c.items.Add(1)
	}
	s.mu.Unlock()
}

// encodePiece appends the ids of one pre-tokenized piece (raw bytes).
func (m *bpe) encodePiece(dst []int, piece string) []int {
	cacheable := len(piece) > 1 && len(piece) <= maxCachedPiece
	if cacheable {
		if ids, ok := m.cache.get(piece); ok {
			for _, id := range ids {
				dst = append(dst, int(id))
			}
			return dst
		}
	}
	if len(piece) == 1 {
		if id := m.byteID[piece[0]]; id >= 0 {
			return append(dst, int(id))
		}
	}
	var ids []int32
	if m.ignoreMerges {
		if id, ok := m.vocab[m.bl.encode(piece)]; ok {
			ids = []int32{int32(id)}
		}
	}
	if ids == nil {
		ids = m.mergeAll(m.symbolIDs(piece))
	}
	if cacheable {
		m.cache.put(piece, ids)
	}
	for _, id := range ids {
		dst = append(dst, int(id))
	}
	return dst
}

// symbolIDs maps each byte to its token. Bytes missing from the vocabulary
// become the unk token (fused if configured) or are dropped, as in Hugging
// Face's BPE without byte fallback.
func (m *bpe) symbolIDs(piece string) []int32 {
	ids := make([]int32, 0, len(piece))
	prevUnk := false
	for i := 0; i < len(piece); i++ {
		id := m.byteID[piece[i]]
		if id < 0 {
			if m.unkID < 0 || (m.fuseUnk && prevUnk) {
				continue
			}
			id, prevUnk = m.unkID, true
		} else {
			prevUnk = false
		}
		ids = append(ids, id)
	}
	return ids
}

// mergeAll applies merges to syms in place and returns the result.
func (m *bpe) mergeAll(syms []int32) []int32 {
	if len(syms) < 2 {
		return syms
	}
	if len(syms) > 48 {
		return m.mergeHeap(syms)
	}
	// Short pieces: keep each adjacent pair's rank in an array, scan it for
	// the best pair, and after a merge look up only the two pairs it changed.
	var rankBuf, idBuf [48]int32
	ranks, newIDs := rankBuf[:len(syms)-1], idBuf[:len(syms)-1]
	set := func(i int) {
		if mg, ok := m.merges[pairKey(syms[i], syms[i+1])]; ok {
			ranks[i], newIDs[i] = mg.rank, mg.newID
		} else {
			ranks[i] = noMerge
		}
	}
	for i := range ranks {
		set(i)
	}
	for {
		best := -1
		bestRank := int32(noMerge)
		for i, r := range ranks {
			if r < bestRank {
				best, bestRank = i, r
			}
		}
		if best < 0 {
			return syms
		}
		syms[best] = newIDs[best]
		syms = append(syms[:best+1], syms[best+2:]...)
		ranks = append(ranks[:best], ranks[best+1:]...)
		newIDs = append(newIDs[:best], newIDs[best+1:]...)
		if best > 0 {
			set(best - 1)
		}
		if best < len(ranks) {
			set(best)
		}
	}
}

const noMerge = 1<<31 - 1

// mergeHeap is mergeAll for long pieces: O(n log n) with a priority queue of
// candidate pairs ordered by (rank, position) over a linked list of symbols,
// the same order Hugging Face's BPE uses.
func (m *bpe) mergeHeap(syms []int32) []int32 {
	n := len(syms)
	prev := make([]int32, n)
	next := make([]int32, n)
	alive := make([]bool, n)
	for i := range syms {
		prev[i], next[i], alive[i] = int32(i-1), int32(i+1), true
	}
	next[n-1] = -1
	h := candHeap{}
	push := func(pos int32) {
		if pos < 0 || next[pos] < 0 {
			return
		}
		if mg, ok := m.merges[pairKey(syms[pos], syms[next[pos]])]; ok {
			h.push(cand{rank: mg.rank, pos: pos, newID: mg.newID, right: syms[next[pos]]})
		}
	}
	for i := int32(0); i < int32(n-1); i++ {
		push(i)
	}
	for len(h) > 0 {
		c := h.pop()
		r := next[c.pos]
		// Skip stale candidates: the left symbol was absorbed or changed, or
		// its right neighbour is no longer the symbol the rule was made for.
		if !alive[c.pos] || r < 0 || syms[r] != c.right {
			continue
		}
		if mg, ok := m.merges[pairKey(syms[c.pos], syms[r])]; !ok || mg.newID != c.newID {
			continue
		}
		syms[c.pos] = c.newID
		alive[r] = false
		next[c.pos] = next[r]
		if next[r] >= 0 {
			prev[next[r]] = c.pos
		}
		push(prev[c.pos])
		push(c.pos)
	}
	out := syms[:0]
	for i := int32(0); i >= 0; i = next[i] {
		out = append(out, syms[i])
	}
	return out
}

type cand struct {
	rank, pos, newID, right int32
}

func (a cand) less(b cand) bool {
	if a.rank != b.rank {
		return a.rank < b.rank
	}
	return a.pos < b.pos
}

// candHeap is a binary min-heap of merge candidates.
type candHeap []cand

func (h *candHeap) push(c cand) {
	*h = append(*h, c)
	s := *h
	for i := len(s) - 1; i > 0; {
		p := (i - 1) / 2
		if !s[i].less(s[p]) {
			break
		}
		s[i], s[p] = s[p], s[i]
		i = p
	}
}

func (h *candHeap) pop() cand {
	s := *h
	top := s[0]
	last := len(s) - 1
	s[0] = s[last]
	s = s[:last]
	for i := 0; ; {
		l, r, min := 2*i+1, 2*i+2, i
		if l < len(s) && s[l].less(s[min]) {
			min = l
		}
		if r < len(s) && s[r].less(s[min]) {
			min = r
		}
		if min == i {
			break
		}
		s[i], s[min] = s[min], s[i]
		i = min
	}
	*h = s
	return top
}

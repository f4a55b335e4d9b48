package parallel

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/transport"
)

// A pipeline stage other than the head is an executor: it holds the weights
// of decoder layers [first, end) and their KV cache under the head's global
// block ids, and runs what arrives. Every step's header says, per sequence,
// where its tokens go (position, count) and which blocks the head gave or
// freed; nothing is inferred. The stage checks the header against its own
// record of each sequence and against the rows that came with it.

// ErrStageProtocol marks a step whose header disagrees with the stage's
// state or with its payload (a head/stage bug, or a corrupted link).
var ErrStageProtocol = errors.New("pipeline protocol")

// RingConfig is the head's first message around the ring (a KindControl
// frame): each stage checks that it fits, and adds its layer range.
type RingConfig struct {
	ConfigHash string // model.Config's hash: every stage must run the same model
	Hidden     int
	NumBlocks  int // the head's global block ids are [0, NumBlocks)
	BlockSize  int
	KVDType    int      // kernels.DType of the KV cache
	Ranges     [][2]int // layer ranges of the stages so far, head first
	// Link is how the rows travel once the configuration is round
	// (LinkTCP when empty): with LinkNCCL every hop forms its communicator
	// over its TCP link, and MaxTokens (the largest step) sizes the
	// stages' device receive buffers.
	Link      PipelineLink `json:",omitempty"`
	MaxTokens int          `json:",omitempty"`
}

func encodeRingConfig(c *RingConfig) ([]byte, error) { return json.Marshal(c) }

func decodeRingConfig(b []byte) (*RingConfig, error) {
	var c RingConfig
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("%w: ring config: %v", ErrStageProtocol, err)
	}
	return &c, nil
}

// configHash names a model config (model.Config.Hash, which the daemons
// agree plans by), so stages refuse to join a head that runs another model.
func configHash(c *model.Config) string { return c.Hash() }

// Stage executes decoder layers [W.Selection.FirstLayer, EndLayer).
// It is not safe for concurrent use: ServeStage runs it on one goroutine
// (Stats may be read from any).
type Stage struct {
	Cfg *model.Config
	BE  kernels.Backend
	W   *model.Weights

	kv       *KVPool // its allocator is unused: blocks are the head's
	seqs     map[uint64]*stageSeq
	owner    map[int32]uint64 // block → sequence holding it
	lastStep uint64
	started  bool
	stats    stageStats // read by Stats from other goroutines
	ranks    RankGroup  // runs the layers on several ranks (ranks.go); nil: BE does
}

type stageSeq struct {
	blocks []int32
	len    int // tokens whose K/V this stage's layers hold
}

// NewStage wraps a stage's weights: a layer range without the embedding or
// lm_head (those live on the head). Its KV cache is made when the ring's
// configuration arrives (Configure).
func NewStage(be kernels.Backend, w *model.Weights) (*Stage, error) {
	s := w.Selection
	if s.Embedding || s.LMHead || s.MTP || s.FirstLayer <= 0 || s.EndLayer <= s.FirstLayer || s.EndLayer > w.Config.NumHiddenLayers {
		return nil, fmt.Errorf("stage: weights hold layers [%d,%d) of %d (embedding %v, lm_head %v, mtp %v); an executor stage holds a non-empty layer range after the head's and nothing else",
			s.FirstLayer, s.EndLayer, w.Config.NumHiddenLayers, s.Embedding, s.LMHead, s.MTP)
	}
	return &Stage{Cfg: w.Config, BE: be, W: w, seqs: map[uint64]*stageSeq{}, owner: map[int32]uint64{}}, nil
}

// Layers is the stage's layer range.
func (s *Stage) Layers() (first, end int) { return s.W.Selection.FirstLayer, s.W.Selection.EndLayer }

// Close frees the KV cache (the weights belong to the caller).
func (s *Stage) Close() {
	if s.kv != nil {
		s.kv.Close()
		s.kv = nil
	}
}

// Configure checks the ring configuration, allocates the KV cache for the
// head's block ids, and appends the stage's range. A stage configured
// again (a new ring after a failure) drops every sequence.
func (s *Stage) Configure(c *RingConfig) error {
	first, end := s.Layers()
	switch {
	case c.ConfigHash != configHash(s.Cfg):
		return fmt.Errorf("%w: the head runs model config %s, this stage %s", ErrStageProtocol, c.ConfigHash, configHash(s.Cfg))
	case c.Hidden != s.Cfg.HiddenSize:
		return fmt.Errorf("%w: hidden size %d, this stage's model has %d", ErrStageProtocol, c.Hidden, s.Cfg.HiddenSize)
	case len(c.Ranges) == 0 || c.Ranges[len(c.Ranges)-1][1] != first:
		return fmt.Errorf("%w: stage of layers [%d,%d) follows ranges %v", ErrStageProtocol, first, end, c.Ranges)
	case c.NumBlocks <= 0 || c.BlockSize <= 0:
		return fmt.Errorf("%w: %d KV blocks of %d tokens", ErrStageProtocol, c.NumBlocks, c.BlockSize)
	}
	s.Close()
	layers := end - first
	if s.ranks != nil {
		layers = 0 // the ranks hold the caches; the pool keeps the block bookkeeping
		if err := s.ranks.AllocKV(kernels.DType(c.KVDType), c.NumBlocks, c.BlockSize); err != nil {
			return fmt.Errorf("stage [%d,%d): %w", first, end, err)
		}
	}
	kv, err := NewKVPool(s.BE, kernels.DType(c.KVDType), layers, c.NumBlocks, c.BlockSize, s.Cfg.NumKeyValueHeads, s.Cfg.HeadDim)
	if err != nil {
		return fmt.Errorf("stage [%d,%d): %w", first, end, err)
	}
	s.kv = kv
	s.seqs, s.owner, s.started = map[uint64]*stageSeq{}, map[int32]uint64{}, false
	c.Ranges = append(c.Ranges, [2]int{first, end})
	return nil
}

// Run executes one step: h's header and its hidden rows [T, hidden] (f32,
// little-endian) in; the rows after the stage's layers out, in place.
func (s *Stage) Run(h *transport.Header, rows []byte) error {
	return s.runRows(h, transport.HostBuffer(rows), &hostRows{be: s.BE})
}

// runRows is Run on a payload in host or device memory (mv says which).
func (s *Stage) runRows(h *transport.Header, rows transport.Buffer, mv rowMover) error {
	if s.kv == nil {
		return fmt.Errorf("%w: step %d before the ring configuration", ErrStageProtocol, h.Step)
	}
	if s.started && h.Step <= s.lastStep {
		return fmt.Errorf("%w: step %d after step %d", ErrStageProtocol, h.Step, s.lastStep)
	}
	T, err := checkRows(h, s.Cfg.HiddenSize, int(rows.Len()))
	if err != nil {
		return err
	}
	if err := s.applyBlocks(h.Seqs); err != nil {
		return err
	}
	s.started, s.lastStep = true, h.Step
	if T == 0 {
		return nil // a step that only frees blocks
	}
	b, err := s.batch(h.Seqs)
	if err != nil {
		return err
	}
	if err := s.forward(b, rows, mv); err != nil {
		return fmt.Errorf("stage step %d: %w", h.Step, err)
	}
	for _, m := range h.Seqs {
		if m.Tokens > 0 {
			s.seqs[m.ID].len = int(m.Position) + int(m.Tokens)
		}
	}
	return nil
}

// checkRows verifies that the header's one tensor is f32 [T, hidden] with T
// the sum of the sequences' tokens, and that the payload has its bytes.
func checkRows(h *transport.Header, hidden, payload int) (int, error) {
	T := 0
	for _, m := range h.Seqs {
		T += int(m.Tokens)
	}
	if T == 0 && len(h.Tensors) == 0 && payload == 0 {
		return 0, nil
	}
	if len(h.Tensors) != 1 {
		return 0, fmt.Errorf("%w: step %d carries %d tensors, want 1", ErrStageProtocol, h.Step, len(h.Tensors))
	}
	t := h.Tensors[0]
	want := int64(T) * int64(hidden) * 4
	if t.DType != transport.DTypeF32 || len(t.Shape) != 2 || t.Shape[0] != int64(T) || t.Shape[1] != int64(hidden) ||
		t.Bytes != want || int64(payload) != want {
		return 0, fmt.Errorf("%w: step %d: tensor %v %v of %d bytes (payload %d) for %d tokens × %d f32",
			ErrStageProtocol, h.Step, t.DType, t.Shape, t.Bytes, payload, T, hidden)
	}
	return T, nil
}

// applyBlocks applies every sequence's freed blocks, then every new one, so
// that a block freed by one sequence may be given to another in one step.
func (s *Stage) applyBlocks(metas []transport.SeqMeta) error {
	for _, m := range metas {
		if len(m.FreedBlocks) == 0 {
			continue
		}
		q, ok := s.seqs[m.ID]
		if !ok || len(m.FreedBlocks) != len(q.blocks) {
			return fmt.Errorf("%w: sequence %d frees %d blocks; it holds %d here (a stage frees a sequence whole)",
				ErrStageProtocol, m.ID, len(m.FreedBlocks), s.held(m.ID))
		}
		for i, b := range m.FreedBlocks {
			if q.blocks[i] != b {
				return fmt.Errorf("%w: sequence %d frees block %d, it holds %d there", ErrStageProtocol, m.ID, b, q.blocks[i])
			}
			delete(s.owner, b)
		}
		delete(s.seqs, m.ID)
	}
	for _, m := range metas {
		q := s.seqs[m.ID]
		if q == nil && (len(m.NewBlocks) > 0 || m.Tokens > 0) {
			q = &stageSeq{}
			s.seqs[m.ID] = q
		}
		for _, b := range m.NewBlocks {
			if b < 0 || int(b) >= s.kv.NumBlocks {
				return fmt.Errorf("%w: sequence %d given block %d outside [0,%d)", ErrStageProtocol, m.ID, b, s.kv.NumBlocks)
			}
			if o, taken := s.owner[b]; taken {
				return fmt.Errorf("%w: sequence %d given block %d, which sequence %d still holds", ErrStageProtocol, m.ID, b, o)
			}
			s.owner[b] = m.ID
			q.blocks = append(q.blocks, b)
		}
	}
	return nil
}

func (s *Stage) held(id uint64) int {
	if q, ok := s.seqs[id]; ok {
		return len(q.blocks)
	}
	return 0
}

// batch builds the step's token layout from the header, checking each
// sequence's position against what the stage holds.
func (s *Stage) batch(metas []transport.SeqMeta) (*kernels.Batch, error) {
	b := &kernels.Batch{}
	bs := s.kv.BlockSize
	lens := map[uint64]int{} // with a sequence's entries so far (a verify step's per-token views)
	for _, m := range metas {
		if m.Tokens == 0 {
			continue
		}
		q := s.seqs[m.ID]
		cur, ok := lens[m.ID]
		if !ok {
			cur = q.len
		}
		// A position before the stage's length rolls back rejected draft
		// tokens (their K/V are overwritten); after it would leave a gap.
		if int(m.Position) > cur {
			return nil, fmt.Errorf("%w: sequence %d appends at position %d; this stage holds %d of its tokens", ErrStageProtocol, m.ID, m.Position, cur)
		}
		end := int(m.Position) + int(m.Tokens)
		if end > len(q.blocks)*bs {
			return nil, fmt.Errorf("%w: sequence %d reaches position %d with %d blocks of %d", ErrStageProtocol, m.ID, end, len(q.blocks), bs)
		}
		seq := int32(len(b.BlockTables))
		for pos := int(m.Position); pos < end; pos++ {
			b.Positions = append(b.Positions, int32(pos))
			b.SeqIndex = append(b.SeqIndex, seq)
			b.Slots = append(b.Slots, q.blocks[pos/bs]*int32(bs)+int32(pos%bs))
		}
		b.BlockTables = append(b.BlockTables, q.blocks)
		b.ContextLens = append(b.ContextLens, int32(end))
		lens[m.ID] = max(cur, end)
	}
	return b, b.Validate(bs)
}

// forward runs the stage's layers on rows in place.
func (s *Stage) forward(b *kernels.Batch, rows transport.Buffer, mv rowMover) error {
	dr, onDevice := s.ranks.(*deviceRanks) // rank 0 is s.BE: the rows stay on it (ranks_device.go)
	if s.ranks != nil && !onDevice {
		if rows.Dev != 0 {
			return fmt.Errorf("stage %s: ranks run host rows; this ring moves device rows (use --pipeline-link tcp)", s.name())
		}
		return s.forwardRanks(b, rows.Host)
	}
	h, err := mv.open(rows, b.Tokens(), s.Cfg.HiddenSize)
	if err != nil {
		return err
	}
	defer mv.free(h)
	if onDevice {
		err = dr.runDevice(context.Background(), b, h)
	} else {
		err = s.layers(b, h)
	}
	if err != nil {
		return err
	}
	return mv.store(h, rows)
}

// layers runs the stage's own layers over h.
func (s *Stage) layers(b *kernels.Batch, h *kernels.Tensor) error {
	meta, err := s.BE.UploadBatch(b)
	if err != nil {
		return err
	}
	f := &model.Forward{Cfg: s.Cfg, BE: s.BE, Meta: meta, T: b.Tokens()}
	defer f.Release()
	for i, lw := range s.W.Layers {
		if err := f.Layer(lw, h, s.kv.Layers[i]); err != nil {
			return err
		}
	}
	return nil
}

func putF32s(dst []byte, v []float32) {
	for i, x := range v {
		binary.LittleEndian.PutUint32(dst[4*i:], math.Float32bits(x))
	}
}

// Sequences is the number of sequences whose KV the stage holds.
func (s *Stage) Sequences() int { return len(s.seqs) }

// BlocksHeld is the number of blocks the stage's sequences hold.
func (s *Stage) BlocksHeld() int { return len(s.owner) }

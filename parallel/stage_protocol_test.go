package parallel

import (
	"errors"
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/transport"
)

// TestStageRefusesInconsistentSteps: every header is checked against the
// stage's own record and against its payload; nothing is inferred.
func TestStageRefusesInconsistentSteps(t *testing.T) {
	dir := fixtureDir("tiny")
	be, w := loadFixtureSelection(t, dir, stageSelection(2, 4))
	hidden := w.Config.HiddenSize
	rows := func(T int) []byte { return make([]byte, 4*T*hidden) }
	step := func(id uint64, T int, seqs ...transport.SeqMeta) (*transport.Header, []byte) {
		h := &transport.Header{Step: id, Kind: transport.KindActivations, Seqs: seqs}
		if T > 0 {
			h.Tensors = []transport.TensorMeta{{DType: transport.DTypeF32, Shape: []int64{int64(T), int64(hidden)}, Bytes: int64(4 * T * hidden)}}
		}
		return h, rows(T)
	}
	seq := func(id uint64, pos int64, tokens int32, newBlocks ...int32) transport.SeqMeta {
		return transport.SeqMeta{ID: id, Position: pos, Tokens: tokens, NewBlocks: newBlocks}
	}
	// Every case starts from a stage that ran step 1: sequence 1 holds block 0
	// and 3 tokens.
	cases := []struct {
		name string
		run  func() (*transport.Header, []byte)
		want string
	}{
		{"a step id not after the last", func() (*transport.Header, []byte) { return step(1, 1, seq(1, 3, 1)) }, "after step 1"},
		{"rows fewer than the tokens", func() (*transport.Header, []byte) {
			h, _ := step(2, 2, seq(1, 3, 2))
			return h, rows(1)
		}, "payload"},
		{"a shape that is not [T, hidden]", func() (*transport.Header, []byte) {
			h, r := step(2, 1, seq(1, 3, 1))
			h.Tensors[0].Shape = []int64{int64(hidden), 1}
			return h, r
		}, "tokens ×"},
		{"a gap in the positions", func() (*transport.Header, []byte) { return step(2, 1, seq(1, 5, 1)) }, "holds 3 of its tokens"},
		{"past the blocks given", func() (*transport.Header, []byte) { return step(2, 16, seq(1, 3, 16)) }, "with 1 blocks"},
		{"a block another sequence holds", func() (*transport.Header, []byte) { return step(2, 1, seq(2, 0, 1, 0)) }, "still holds"},
		{"a block outside the pool", func() (*transport.Header, []byte) { return step(2, 1, seq(2, 0, 1, 4096)) }, "outside"},
		{"freeing blocks not held", func() (*transport.Header, []byte) {
			return step(2, 0, transport.SeqMeta{ID: 1, FreedBlocks: []int32{5}})
		}, "frees block 5"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			st, err := NewStage(be, w)
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			if err := st.Run(step(1, 1, seq(1, 0, 1))); err == nil || !errors.Is(err, ErrStageProtocol) {
				t.Fatalf("a step before the ring configuration: %v", err)
			}
			cfg := &RingConfig{ConfigHash: configHash(w.Config), Hidden: hidden, NumBlocks: 8, BlockSize: 16, KVDType: 0, Ranges: [][2]int{{0, 2}}}
			if err := st.Configure(cfg); err != nil {
				t.Fatal(err)
			}
			if err := st.Run(step(1, 3, seq(1, 0, 3, 0))); err != nil {
				t.Fatal(err)
			}
			err = st.Run(tc.run())
			if err == nil || !errors.Is(err, ErrStageProtocol) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want a protocol error saying %q", err, tc.want)
			}
		})
	}
}

func TestStageRefusesAnotherModelsRing(t *testing.T) {
	be, w := loadFixtureSelection(t, fixtureDir("tiny"), stageSelection(2, 4))
	st, err := NewStage(be, w)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	good := RingConfig{ConfigHash: configHash(w.Config), Hidden: w.Config.HiddenSize, NumBlocks: 8, BlockSize: 16, Ranges: [][2]int{{0, 2}}}
	for name, mut := range map[string]func(*RingConfig){
		"config hash": func(c *RingConfig) { c.ConfigHash = "0123" },
		"hidden size": func(c *RingConfig) { c.Hidden++ },
		"layer gap":   func(c *RingConfig) { c.Ranges = [][2]int{{0, 1}} },
		"no blocks":   func(c *RingConfig) { c.NumBlocks = 0 },
	} {
		c := good
		mut(&c)
		if err := st.Configure(&c); !errors.Is(err, ErrStageProtocol) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if err := st.Configure(&good); err != nil {
		t.Fatal(err)
	}
}

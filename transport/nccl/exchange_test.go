package nccl

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
)

// doneDevice runs calls on the calling thread; every stream is done.
type doneDevice struct{}

func (doneDevice) Do(fn func() error) error         { return fn() }
func (doneDevice) StreamDone(uintptr) (bool, error) { return true, nil }

// stagingSim is a StagingBackend in host memory that plays the peers of
// a fake-NCCL communicator: when the exchange downloads the gathered
// counts it fills them in from what this rank's ncclAllGather sent and the
// peers' rows (rows), and when it downloads the values it fills each
// recorded ncclRecv with what that peer sends (payload; a rank's block to
// itself is its own recorded ncclSend) and notes every ncclSend.
type stagingSim struct {
	f       *fakeLib
	rank    int
	rows    [][]int64                // rows[r][p]: what peer r announces it sends p
	ownRow  []int64                  // non-nil: the gather hands this rank this row back (corruption)
	payload func(r, n int) []float32 // what peer r sends this rank
	sent    map[int][]float32        // what this rank's ncclSends carried, by peer
	mem     map[uintptr][]byte
	next    uintptr
	live    int
}

func newSim(f *fakeLib, rank int, rows [][]int64) *stagingSim {
	return &stagingSim{f: f, rank: rank, rows: rows, mem: map[uintptr][]byte{}, next: 0x100000,
		payload: func(r, n int) []float32 {
			v := make([]float32, n)
			for i := range v {
				v[i] = float32(100*r + i)
			}
			return v
		}}
}

func (s *stagingSim) DevicePointer(t *kernels.Tensor) (uintptr, error) {
	p, _ := t.Impl.(uintptr)
	return p, nil
}
func (s *stagingSim) Stream() uintptr { return 0x77 }

func (s *stagingSim) NewTensor(dt kernels.DType, shape ...int) (*kernels.Tensor, error) {
	t := &kernels.Tensor{DType: dt, Shape: shape, Impl: s.next}
	n := t.Elements() * dt.Size()
	s.mem[s.next] = make([]byte, n)
	s.next += uintptr(n+0xfff) &^ 0xfff
	s.live++
	return t, nil
}

func (s *stagingSim) Free(t *kernels.Tensor) { s.live-- }

func (s *stagingSim) Upload(t *kernels.Tensor, data []byte) error {
	if len(data) != t.Elements()*t.DType.Size() {
		return fmt.Errorf("upload of %d bytes into %v", len(data), t.Shape)
	}
	copy(s.mem[t.Impl.(uintptr)], data)
	return nil
}

// at is the n bytes at device address p.
func (s *stagingSim) at(p uintptr, n int) []byte {
	for base, b := range s.mem {
		if p >= base && p+uintptr(n) <= base+uintptr(len(b)) {
			return b[p-base : p-base+uintptr(n)]
		}
	}
	panic(fmt.Sprintf("no device memory at %#x+%d", p, n))
}

func (s *stagingSim) DownloadI32(t *kernels.Tensor) ([]int32, error) {
	for _, c := range s.f.calls() {
		if c.fn != fAllGather {
			continue
		}
		n := int(c.args[2])
		all := s.at(uintptr(c.args[1]), 8*n*len(s.rows))
		for r := range s.rows {
			row := s.at(uintptr(c.args[0]), 8*n)
			if r != s.rank || s.ownRow != nil {
				row = make([]byte, 8*n)
				src := s.rows[r]
				if r == s.rank {
					src = s.ownRow
				}
				for p, v := range src {
					binary.LittleEndian.PutUint64(row[8*p:], uint64(v))
				}
			}
			copy(all[8*n*r:], row)
		}
	}
	b := s.mem[t.Impl.(uintptr)]
	out := make([]int32, len(b)/4)
	for i := range out {
		out[i] = int32(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return out, nil
}

func (s *stagingSim) Download(t *kernels.Tensor) ([]float32, error) {
	calls := s.f.calls()
	s.sent = map[int][]float32{}
	for _, c := range calls {
		if c.fn == fSend {
			s.sent[int(c.args[3])] = f32s(s.at(uintptr(c.args[0]), 4*int(c.args[1])))
		}
	}
	for _, c := range calls {
		if c.fn != fRecv {
			continue
		}
		peer, n := int(c.args[3]), int(c.args[1])
		v := s.payload(peer, n)
		if peer == s.rank {
			v = s.sent[peer]
		}
		copy(s.at(uintptr(c.args[0]), 4*n), f32Bytes(v))
	}
	return f32s(s.mem[t.Impl.(uintptr)]), nil
}

func f32s(b []byte) []float32 {
	v := make([]float32, len(b)/4)
	for i := range v {
		v[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return v
}

// exchangeComm is a fresh fake communicator: rank 1 of 3.
func exchangeComm(t *testing.T, f *fakeLib, dev device) *Comm {
	t.Helper()
	f.set(modeJoins)
	c, err := initRank(context.Background(), f.l, dev, UniqueID{}, 3, 1, time.Second, InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	f.set(modeJoins)
	return c
}

// TestExchangeStaged: AllToAllV and AllGatherV on rank 1 of 3 gather the
// count rows (n int64s per rank), move the values with the counts the
// peers announced, split what arrives by sender and free their staging.
func TestExchangeStaged(t *testing.T) {
	f := buildFake(t, false)
	rows := [][]int64{{2, 1, 0}, nil, {0, 3, 4}}
	t.Run("all-to-all-v", func(t *testing.T) {
		c := exchangeComm(t, f, doneDevice{})
		sim := newSim(f, 1, rows)
		ar := NewTensorAllReducer(c, sim)
		send := [][]float32{{1, 2}, {9}, {3, 4, 5}}
		got, err := ar.AllToAllV(send)
		if err != nil {
			t.Fatal(err)
		}
		want := [][]float32{sim.payload(0, 1), {9}, sim.payload(2, 3)}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("received %v, want %v", got, want)
		}
		if !reflect.DeepEqual(sim.sent, map[int][]float32{0: {1, 2}, 1: {9}, 2: {3, 4, 5}}) {
			t.Fatalf("sent %v", sim.sent)
		}
		gathers := 0
		for _, call := range f.calls() {
			if call.fn == fAllGather {
				gathers++
				if call.args[2] != 3 || call.args[3] != int64(Int64) {
					t.Fatalf("counts gathered as %d of type %d, want 3 int64s", call.args[2], call.args[3])
				}
			}
		}
		if gathers != 1 || sim.live != 0 || f.aborts() != 0 {
			t.Fatalf("%d count gathers, %d staging tensors live, %d aborts", gathers, sim.live, f.aborts())
		}
	})
	t.Run("all-gather-v", func(t *testing.T) {
		c := exchangeComm(t, f, doneDevice{})
		sim := newSim(f, 1, [][]int64{{3, 3, 3}, nil, {0, 0, 0}})
		got, err := NewTensorAllReducer(c, sim).AllGatherV([]float32{7, 8})
		if err != nil {
			t.Fatal(err)
		}
		if want := append(sim.payload(0, 3), 7, 8); !reflect.DeepEqual(got, want) {
			t.Fatalf("gathered %v, want %v", got, want)
		}
		if !reflect.DeepEqual(sim.sent, map[int][]float32{0: {7, 8}, 1: {7, 8}, 2: {7, 8}}) || sim.live != 0 {
			t.Fatalf("sent %v, %d staging tensors live", sim.sent, sim.live)
		}
	})
}

// TestExchangeRejects: a count matrix that cannot be right, a wrong number
// of parts, a backend that cannot stage and a stream that never finishes
// all fail with a clear error, the communicator aborted where NCCL was
// already in the exchange; no values move after a bad count.
func TestExchangeRejects(t *testing.T) {
	f := buildFake(t, false)
	send := [][]float32{{1}, {2}, {3}}
	for _, tc := range []struct {
		name    string
		edit    func(s *stagingSim)
		wantErr string
	}{
		{"own row corrupted", func(s *stagingSim) { s.ownRow = []int64{1, 1, 2} }, "gathered count for rank 2 is 2, but it sends 1"},
		{"negative count", func(s *stagingSim) { s.rows[2] = []int64{0, -5, 0} }, "rank 2 announced -5 values for rank 1"},
		{"huge count", func(s *stagingSim) { s.rows[0] = []int64{0, 1 << 40, 0} }, "rank 0 announced 1099511627776"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := exchangeComm(t, f, doneDevice{})
			sim := newSim(f, 1, [][]int64{{1, 1, 1}, nil, {1, 1, 1}})
			tc.edit(sim)
			_, err := NewTensorAllReducer(c, sim).AllToAllV(send)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "communicator aborted") {
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
			for _, call := range f.calls() {
				if call.fn == fSend || call.fn == fRecv {
					t.Fatalf("values moved after a bad count: %v", f.calls())
				}
			}
			if f.aborts() != 1 {
				t.Fatalf("%d aborts", f.aborts())
			}
		})
	}
	c := exchangeComm(t, f, doneDevice{})
	if _, err := NewTensorAllReducer(c, newSim(f, 1, nil)).AllToAllV(send[:2]); err == nil || !strings.Contains(err.Error(), "2 parts for 3 ranks") || f.nrec() != 0 {
		t.Fatalf("two parts: %v, %d NCCL calls", err, f.nrec())
	}
	if _, err := NewTensorAllReducer(c, fakeTensors{}).AllGatherV([]float32{1}); err == nil || !strings.Contains(err.Error(), "cannot stage") || f.nrec() != 0 {
		t.Fatalf("backend without staging: %v, %d NCCL calls", err, f.nrec())
	}
	// A peer that never comes: the counts' all-gather never completes.
	c = exchangeComm(t, f, hostDevice{})
	ar := NewTensorAllReducer(c, newSim(f, 1, [][]int64{{1, 1, 1}, nil, {1, 1, 1}}))
	ar.SetEnqueueTimeout(100 * time.Millisecond)
	t0 := time.Now()
	_, err := ar.AllToAllV(send)
	if el := time.Since(t0); el > 2*time.Second {
		t.Fatalf("returned after %v", el)
	}
	if err == nil || !strings.Contains(err.Error(), "deadline exceeded") || f.aborts() != 1 {
		t.Fatalf("stuck exchange: %v, %d aborts", err, f.aborts())
	}
}

// TestExchangeOneRank: one rank hands the data back without NCCL or a
// staging backend.
func TestExchangeOneRank(t *testing.T) {
	ar := NewTensorAllReducer(nil, fakeTensors{})
	got, err := ar.AllToAllV([][]float32{{1, 2}})
	if err != nil || !reflect.DeepEqual(got, [][]float32{{1, 2}}) {
		t.Fatalf("AllToAllV = %v, %v", got, err)
	}
	part, err := ar.AllGatherV([]float32{3})
	if err != nil || !reflect.DeepEqual(part, []float32{3}) {
		t.Fatalf("AllGatherV = %v, %v", part, err)
	}
	if _, err := ar.AllToAllV([][]float32{{1}, {2}}); err == nil || !strings.Contains(err.Error(), "2 parts for 1 ranks") {
		t.Fatalf("two parts on one rank: %v", err)
	}
}

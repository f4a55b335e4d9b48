package nccl

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cuda"
)

// The collective tests run one sequence (collectiveChecks) on every rank:
// each rank fills its inputs from a formula of (rank, index) whose values
// are small integers (exact in bf16, and their sums too), runs the
// collective, and compares what arrived with the same computation done on
// the CPU.

// collChildEnv carries the unique id (hex) to the child rank of
// TestCollectivesTwoRanks; TestMain runs collChild when it is set.
const collChildEnv = "GLMTOPO_NCCL_COLL_CHILD"

// val is rank r's input element i of collective k: an integer in [-8, 8].
func val(k, r, i int) float32 { return float32((i*7+r*13+k*5)%17) - 8 }

// a2aCount is how many elements rank r sends rank p in the all-to-all-v
// (zero for rank 1 to itself: a skipped pair).
func a2aCount(r, p int) int64 {
	if r == 1 && p == 1 {
		return 0
	}
	return int64(100*(r+1) + 37*p + 1)
}

func toBytes(v []float32, d DType) []byte {
	b := make([]byte, int64(len(v))*d.Size())
	for i, x := range v {
		if d == BFloat16 {
			binary.LittleEndian.PutUint16(b[2*i:], uint16(math.Float32bits(x)>>16))
		} else {
			binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
		}
	}
	return b
}

func fromBytes(b []byte, d DType) []float32 {
	n := int64(len(b)) / d.Size()
	v := make([]float32, n)
	for i := range v {
		if d == BFloat16 {
			v[i] = math.Float32frombits(uint32(binary.LittleEndian.Uint16(b[2*i:])) << 16)
		} else {
			v[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
		}
	}
	return v
}

// rankEnv is one rank's device, communicator and stream for the checks.
type rankEnv struct {
	ctx    context.Context
	dev    *cuda.Device
	comm   *Comm
	stream uintptr
	bufs   []uintptr
	be     *cuda.Backend // made by backend() for the checks that stage through one
}

func (e *rankEnv) alloc(n int64) (Buffer, error) {
	p, err := e.dev.Alloc(n)
	if err != nil {
		return Buffer{}, err
	}
	e.bufs = append(e.bufs, p)
	return Buffer{Ptr: p, Bytes: n}, nil
}

func (e *rankEnv) free() {
	for _, p := range e.bufs {
		e.dev.Free(p)
	}
	e.dev.DestroyStream(e.stream)
	if e.be != nil {
		e.be.Close()
	}
}

// upload makes a device buffer holding v in type d.
func (e *rankEnv) upload(v []float32, d DType) (Buffer, error) {
	b, err := e.alloc(int64(len(v)) * d.Size())
	if err != nil {
		return b, err
	}
	return b, e.dev.CopyToDevice(b.Ptr, toBytes(v, d))
}

func (e *rankEnv) download(b Buffer, n int64, d DType) ([]float32, error) {
	if err := e.comm.Wait(e.ctx, e.stream); err != nil {
		return nil, err
	}
	out := make([]byte, n*d.Size())
	if err := e.dev.CopyToHost(out, b.Ptr); err != nil {
		return nil, err
	}
	return fromBytes(out, d), nil
}

func equal(what string, got, want []float32) error {
	if len(got) != len(want) {
		return fmt.Errorf("%s: %d elements, want %d", what, len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			return fmt.Errorf("%s: element %d is %v, want %v", what, i, got[i], want[i])
		}
	}
	return nil
}

// collectiveCheck is one collective run and verified on every rank.
type collectiveCheck struct {
	name string
	run  func(e *rankEnv) error
}

var collectiveChecks = []collectiveCheck{
	{"all-reduce f32 out of place", func(e *rankEnv) error { return checkAllReduceOn(e, 1, 3*5120+1, Float32, false) }},
	{"all-reduce bf16 in place", func(e *rankEnv) error { return checkAllReduceOn(e, 2, 64*5120, BFloat16, true) }},
	{"all-reduce bf16 20 MiB", func(e *rankEnv) error { return checkAllReduceOn(e, 3, 2048*5120, BFloat16, true) }},
	{"all-gather bf16", checkAllGatherOn},
	{"reduce-scatter f32", checkReduceScatterOn},
	{"all-to-all-v bf16", checkAllToAllVOn},
	{"tensor all-reduce", checkTensorAllReduceOn},
	{"broadcast f32 from each root", checkBroadcastOn},
	{"tensor broadcast i32 and f8 bytes", checkTensorBroadcastOn},
	{"staged all-to-all-v and all-gather-v", checkExchangeOn},
}

func checkAllReduceOn(e *rankEnv, k int, n int64, d DType, inPlace bool) error {
	in, want := make([]float32, n), make([]float32, n)
	for i := range in {
		in[i] = val(k, e.comm.Rank(), i)
		for r := range e.comm.Size() {
			want[i] += val(k, r, i)
		}
	}
	send, err := e.upload(in, d)
	if err != nil {
		return err
	}
	recv := send
	if !inPlace {
		if recv, err = e.alloc(send.Bytes); err != nil {
			return err
		}
	}
	if err := e.comm.AllReduce(e.ctx, e.stream, send, recv, n, d); err != nil {
		return err
	}
	got, err := e.download(recv, n, d)
	if err != nil {
		return err
	}
	return equal("sum", got, want)
}

func checkAllGatherOn(e *rankEnv) error {
	const k, n = 4, 1000
	size, rank := e.comm.Size(), e.comm.Rank()
	in := make([]float32, n)
	want := make([]float32, n*size)
	for i := range in {
		in[i] = val(k, rank, i)
	}
	for r := range size {
		for i := range n {
			want[r*n+i] = val(k, r, i)
		}
	}
	send, err := e.upload(in, BFloat16)
	if err != nil {
		return err
	}
	recv, err := e.alloc(int64(n*size) * 2)
	if err != nil {
		return err
	}
	if err := e.comm.AllGather(e.ctx, e.stream, send, recv, n, BFloat16); err != nil {
		return err
	}
	got, err := e.download(recv, int64(n*size), BFloat16)
	if err != nil {
		return err
	}
	return equal("gathered", got, want)
}

func checkReduceScatterOn(e *rankEnv) error {
	const k, n = 5, 777
	size, rank := e.comm.Size(), e.comm.Rank()
	in := make([]float32, n*size)
	want := make([]float32, n)
	for i := range in {
		in[i] = val(k, rank, i)
	}
	for i := range want {
		for r := range size {
			want[i] += val(k, r, rank*n+i)
		}
	}
	send, err := e.upload(in, Float32)
	if err != nil {
		return err
	}
	recv, err := e.alloc(n * 4)
	if err != nil {
		return err
	}
	if err := e.comm.ReduceScatter(e.ctx, e.stream, send, recv, n, Float32); err != nil {
		return err
	}
	got, err := e.download(recv, n, Float32)
	if err != nil {
		return err
	}
	return equal("scattered sum", got, want)
}

func checkAllToAllVOn(e *rankEnv) error {
	const k = 6
	size, rank := e.comm.Size(), e.comm.Rank()
	a := &AllToAllV{DType: BFloat16, SendCounts: make([]int64, size), RecvCounts: make([]int64, size)}
	for p := range size {
		a.SendCounts[p], a.RecvCounts[p] = a2aCount(rank, p), a2aCount(p, rank)
	}
	sd, sn := Packed(a.SendCounts)
	rd, rn := Packed(a.RecvCounts)
	in, want := make([]float32, sn), make([]float32, rn)
	for p := range size {
		for i := range a.SendCounts[p] {
			in[sd[p]+i] = val(k, rank*size+p, int(i)) // what rank sends p
		}
		for i := range a.RecvCounts[p] {
			want[rd[p]+i] = val(k, p*size+rank, int(i)) // what p sends rank
		}
	}
	var err error
	if a.Send, err = e.upload(in, BFloat16); err != nil {
		return err
	}
	if a.Recv, err = e.alloc(max(rn, 1) * 2); err != nil {
		return err
	}
	if err := e.comm.AllToAllV(e.ctx, e.stream, a); err != nil {
		return err
	}
	got, err := e.download(a.Recv, rn, BFloat16)
	if err != nil {
		return err
	}
	return equal("exchanged", got, want)
}

// devTensors is a TensorBackend over raw allocations (Impl is the address).
type devTensors struct{ stream uintptr }

func (devTensors) DevicePointer(t *kernels.Tensor) (uintptr, error) {
	p, ok := t.Impl.(uintptr)
	if !ok || p == 0 {
		return 0, errors.New("not a device tensor")
	}
	return p, nil
}
func (d devTensors) Stream() uintptr { return d.stream }

func checkTensorAllReduceOn(e *rankEnv) error {
	const k, rows, cols = 7, 16, 5120
	in, want := make([]float32, rows*cols), make([]float32, rows*cols)
	for i := range in {
		in[i] = val(k, e.comm.Rank(), i)
		for r := range e.comm.Size() {
			want[i] += val(k, r, i)
		}
	}
	b, err := e.upload(in, Float32)
	if err != nil {
		return err
	}
	ar := NewTensorAllReducer(e.comm, devTensors{stream: e.stream})
	// Size 1 skips NCCL (identity): the sum is the input either way.
	if err := ar.AllReduceSumContext(e.ctx, &kernels.Tensor{DType: kernels.F32, Shape: []int{rows, cols}, Impl: b.Ptr}); err != nil {
		return err
	}
	if err := ar.Wait(e.ctx); err != nil {
		return err
	}
	got, err := e.download(b, rows*cols, Float32)
	if err != nil {
		return err
	}
	return equal("tensor sum", got, want)
}

// runChecks runs every check on this rank, stopping at the first failure.
func runChecks(ctx context.Context, dev *cuda.Device, comm *Comm, logf func(string, ...any)) error {
	stream, err := dev.NewStream()
	if err != nil {
		return err
	}
	e := &rankEnv{ctx: ctx, dev: dev, comm: comm, stream: stream}
	defer e.free()
	for _, c := range collectiveChecks {
		t0 := time.Now()
		if err := c.run(e); err != nil {
			return fmt.Errorf("rank %d of %d: %s: %w", comm.Rank(), comm.Size(), c.name, err)
		}
		logf("rank %d of %d: %s ok (%v)", comm.Rank(), comm.Size(), c.name, time.Since(t0).Round(time.Microsecond))
	}
	return nil
}

// TestCollectivesOneRank: on a one-rank communicator every collective
// calls NCCL and leaves the data intact (the sum, gather, scatter and
// exchange of one rank are identities).
func TestCollectivesOneRank(t *testing.T) {
	dev := openGPU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	comm := oneRankComm(t, ctx, dev, InitOptions{})
	if err := runChecks(ctx, dev, comm, t.Logf); err != nil {
		t.Fatal(err)
	}
}

// TestCollectivesTwoRanks: this process (rank 0) and a child (rank 1, its
// own NCCL_HOSTID so NCCL accepts two ranks on one GPU; run under the MPS
// daemon) run every collective; both compare with the CPU's result.
func TestCollectivesTwoRanks(t *testing.T) {
	if os.Getenv("NCCL_HOSTID") == "" {
		t.Skip("set NCCL_HOSTID (scripts/gpu-collective.sh does) so that two ranks may share one GPU")
	}
	dev := openGPU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	id, err := NewUniqueID()
	if err != nil {
		t.Fatal(err)
	}
	child := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	child.Env = append(os.Environ(), collChildEnv+"="+hex.EncodeToString(id[:]), "NCCL_HOSTID="+os.Getenv("NCCL_HOSTID")+"-child")
	child.Stdout, child.Stderr = os.Stderr, os.Stderr
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		err := child.Wait()
		if err != nil {
			cancel() // rank 0 would wait for it until the deadline
		}
		done <- err
	}()
	defer func() {
		child.Process.Kill()
		<-done
	}()
	comm, err := InitRank(ctx, dev, id, 2, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer comm.Close()
	if err := runChecks(ctx, dev, comm, t.Logf); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		done <- err // for the deferred wait
		if err != nil {
			t.Fatalf("rank 1: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("rank 1 did not finish")
	}
}

// collChild is rank 1 of TestCollectivesTwoRanks.
func collChild(idHex string) error {
	b, err := hex.DecodeString(idHex)
	if err != nil {
		return err
	}
	id, err := ParseUniqueID(b)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 80*time.Second)
	defer cancel()
	dev, err := cuda.OpenDevice(0)
	if err != nil {
		return err
	}
	defer dev.Close()
	comm, err := InitRank(ctx, dev, id, 2, 1)
	if err != nil {
		return err
	}
	defer comm.Close()
	return runChecks(ctx, dev, comm, func(f string, a ...any) { fmt.Fprintf(os.Stderr, f+"\n", a...) })
}

// TestCollectiveInGraph: an all-reduce queued on a cuda.Backend's stream
// during a capture is recorded like a kernel and runs at each launch
// (one-rank communicator, out of place: NCCL's copy is what the graph
// replays).
func TestCollectiveInGraph(t *testing.T) {
	dev := openGPU(t)
	b, err := cuda.New(cuda.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	comm := oneRankComm(t, ctx, dev, InitOptions{})
	const n = 4 * 5120
	x, err := b.NewTensor(kernels.F32, n)
	if err != nil {
		t.Fatal(err)
	}
	y, err := b.NewTensor(kernels.F32, n)
	if err != nil {
		t.Fatal(err)
	}
	xp, _ := b.DevicePointer(x)
	yp, _ := b.DevicePointer(y)
	if err := b.BeginCapture(); err != nil {
		t.Fatal(err)
	}
	err = comm.AllReduce(ctx, b.Stream(), Buffer{Ptr: xp, Bytes: n * 4}, Buffer{Ptr: yp, Bytes: n * 4}, n, Float32)
	g, cerr := b.EndCapture()
	if err != nil || cerr != nil {
		t.Fatalf("all-reduce in a capture: %v; end capture: %v", err, cerr)
	}
	defer g.Close()
	for round := range 2 {
		in := make([]float32, n)
		for i := range in {
			in[i] = val(round, 0, i)
		}
		if err := b.Upload(x, toBytes(in, Float32)); err != nil {
			t.Fatal(err)
		}
		if err := g.Launch(); err != nil {
			t.Fatal(err)
		}
		got, err := b.Download(y)
		if err != nil {
			t.Fatal(err)
		}
		if err := equal(fmt.Sprintf("launch %d", round), got, in); err != nil {
			t.Fatal(err)
		}
	}
}

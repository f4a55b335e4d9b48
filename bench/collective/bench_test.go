package collectivebench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/transport/nccl"
)

func TestBusFactor(t *testing.T) {
	for _, tc := range []struct {
		op   string
		n    int
		want float64
	}{
		{OpAllReduce, 1, 0}, {OpAllReduce, 2, 1}, {OpAllReduce, 4, 1.5}, {OpAllReduce, 8, 1.75},
		{OpAllGather, 2, 0.5}, {OpAllGather, 8, 0.875},
		{OpReduceScatter, 4, 0.75}, {OpAllToAllV, 4, 0.75}, {OpAllToAllV, 1, 0},
	} {
		got, err := BusFactor(tc.op, tc.n)
		if err != nil || got != tc.want {
			t.Errorf("BusFactor(%s, %d) = %v, %v; want %v", tc.op, tc.n, got, err, tc.want)
		}
	}
	if _, err := BusFactor("broadcast", 2); err == nil {
		t.Error("unknown collective accepted")
	}
	if _, err := BusFactor(OpAllReduce, 0); err == nil {
		t.Error("zero ranks accepted")
	}
}

// TestShapeAndBandwidth: sizes are nccl-tests' (the whole tensor), the
// split collectives round to a multiple of the ranks, and the bandwidths
// are size / p50 scaled by the bus factor.
func TestShapeAndBandwidth(t *testing.T) {
	for _, tc := range []struct {
		op                string
		elems             int64
		n                 int
		count, sizeElems  int64
		p50us, alg, busbw float64
	}{
		// 10 KiB of bf16 in 10 µs: 1.024 GB/s algorithm bandwidth.
		{OpAllReduce, 5120, 2, 5120, 5120, 10, 1.024, 1.024},
		{OpAllReduce, 5120, 4, 5120, 5120, 10, 1.024, 1.536},
		{OpAllGather, 5120, 4, 1280, 5120, 10, 1.024, 0.768},
		{OpReduceScatter, 5121, 2, 2560, 5120, 10, 1.024, 0.512},
		{OpAllToAllV, 5120 * 2048, 8, 5120 * 256, 5120 * 2048, 1000, 20.97152, 20.97152 * 7 / 8},
		{OpAllReduce, 5120, 1, 5120, 5120, 10, 1.024, 0},
	} {
		count, sizeElems := Shape(tc.op, tc.elems, tc.n)
		if count != tc.count || sizeElems != tc.sizeElems {
			t.Errorf("Shape(%s, %d, %d) = %d, %d; want %d, %d", tc.op, tc.elems, tc.n, count, sizeElems, tc.count, tc.sizeElems)
		}
		// Calls queued back to back at twice the rate: twice the bus bandwidth.
		r := Result{Op: tc.op, SizeBytes: sizeElems * 2, P50us: tc.p50us, QueuedUs: tc.p50us / 2}
		if err := r.bandwidth(tc.n); err != nil {
			t.Fatal(err)
		}
		if math.Abs(r.AlgBW-tc.alg) > 1e-9 || math.Abs(r.BusBW-tc.busbw) > 1e-9 || math.Abs(r.QueuedBusBW-2*tc.busbw) > 1e-9 {
			t.Errorf("%s on %d ranks: algbw %v busbw %v; want %v %v", tc.op, tc.n, r.AlgBW, r.BusBW, tc.alg, tc.busbw)
		}
	}
}

func rankReport(p50s, p99s []float64) *Report {
	rep := &Report{Ranks: 2, DType: "bf16", Hidden: 5120}
	for i := range p50s {
		rep.Results = append(rep.Results, Result{Op: AllOps[i%len(AllOps)], Phase: "decode", Batch: 1, SizeBytes: 10240, Count: 5120,
			P50us: p50s[i], P99us: p99s[i], QueuedUs: p99s[i] / 2})
	}
	return rep
}

// TestMerge: each size keeps the slowest rank's p50 and p99, and its
// bandwidths follow from the merged p50; reports that disagree are refused.
func TestMerge(t *testing.T) {
	a := rankReport([]float64{10, 40}, []float64{30, 50})
	b := rankReport([]float64{20, 30}, []float64{25, 90})
	m, err := merge([]*Report{a, b})
	if err != nil {
		t.Fatal(err)
	}
	if m.Results[0].P50us != 20 || m.Results[0].P99us != 30 || m.Results[1].P50us != 40 || m.Results[1].P99us != 90 {
		t.Fatalf("merged %+v", m.Results)
	}
	if want := 10240 / 20e-6 / 1e9; math.Abs(m.Results[0].AlgBW-want) > 1e-9 || math.Abs(m.Results[0].BusBW-want) > 1e-9 {
		t.Fatalf("all-reduce on 2 ranks: algbw %v busbw %v, want %v for both", m.Results[0].AlgBW, m.Results[0].BusBW, want)
	}
	if m.Results[1].QueuedUs != 45 || math.Abs(m.Results[1].QueuedBusBW-10240/45e-6/1e9*0.5) > 1e-9 {
		t.Fatalf("all-gather queued: %v µs, %v GB/s", m.Results[1].QueuedUs, m.Results[1].QueuedBusBW)
	}
	if a.Results[0].P50us != 10 {
		t.Fatal("merge changed rank 0's report")
	}
	short := rankReport([]float64{1}, []float64{1})
	if _, err := merge([]*Report{a, short}); err == nil {
		t.Fatal("reports of different lengths merged")
	}
	other := rankReport([]float64{1, 2}, []float64{1, 2})
	other.Results[1].SizeBytes = 1
	if _, err := merge([]*Report{a, other}); err == nil {
		t.Fatal("reports of different sizes merged")
	}
	if _, err := merge(nil); err == nil {
		t.Fatal("no reports merged")
	}
}

// TestJSONShape: the --json document has exactly the documented keys, and
// the table prints one line per result.
func TestJSONShape(t *testing.T) {
	m, err := merge([]*Report{rankReport([]float64{10, 20}, []float64{15, 25})})
	if err != nil {
		t.Fatal(err)
	}
	m.Devices, m.NCCLVersion = []int{0, 0}, 22809
	var buf bytes.Buffer
	if err := writeJSON(&buf, m); err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := json.Unmarshal(buf.Bytes(), &doc); err != nil {
		t.Fatal(err)
	}
	keys := func(m map[string]any) []string {
		var k []string
		for s := range m {
			k = append(k, s)
		}
		sort.Strings(k)
		return k
	}
	if got, want := keys(doc), []string{"devices", "dtype", "hidden", "mps", "nccl_version", "ranks", "results", "shared_gpu"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("top-level keys %v, want %v", got, want)
	}
	res := doc["results"].([]any)
	if len(res) != 2 {
		t.Fatalf("%d results", len(res))
	}
	want := []string{"algbw_gbps", "batch", "busbw_gbps", "count", "op", "p50_us", "p99_us", "phase", "queued_busbw_gbps", "queued_us", "size_bytes"}
	for i, r := range res {
		if got := keys(r.(map[string]any)); !reflect.DeepEqual(got, want) {
			t.Fatalf("result %d keys %v, want %v", i, got, want)
		}
	}
	buf.Reset()
	writeTable(&buf, m)
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 4 || !strings.Contains(lines[0], "NCCL 2.28.9") || !strings.Contains(lines[2], "all-reduce") || !strings.Contains(lines[2], "10 KiB") {
		t.Fatalf("table:\n%s", buf.String())
	}
}

func TestParseFlags(t *testing.T) {
	o, asJSON, err := parseFlags([]string{"--json", "--ranks", "4", "--batches", "1,64,2048", "--dtype", "f32", "--ops", "all-gather,all-to-all-v"}, &bytes.Buffer{})
	if err != nil || !asJSON || o.Ranks != 4 || o.DType != nccl.Float32 || !slices.Equal(o.Batches, []int{1, 64, 2048}) || !slices.Equal(o.Ops, []string{OpAllGather, OpAllToAllV}) {
		t.Fatalf("parsed %+v json=%v: %v", o, asJSON, err)
	}
	o, _, err = parseFlags(nil, &bytes.Buffer{})
	if err != nil || o.Ranks != 2 || o.DType != nccl.BFloat16 || o.Hidden != 5120 || len(o.Ops) != 4 || !slices.Equal(o.Batches, []int{1, 2, 4, 8, 16, 32, 64, 2048}) {
		t.Fatalf("defaults %+v: %v", o, err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--ranks", "0"}, "--ranks 0"},
		{[]string{"--dtype", "f16"}, "--dtype"},
		{[]string{"--ops", "all-reduce,broadcast"}, "unknown collective \"broadcast\""},
		{[]string{"--batches", "1,0"}, "--batches"},
		{[]string{"--ranks", "2", "--devices", "0"}, "1 GPUs for 2 ranks"},
		{[]string{"--devices", "0,-1"}, "--devices"},
		{[]string{"--hidden", "1", "--batches", "1", "--ranks", "2"}, "fewer elements than 2 ranks"},
		{[]string{"--iters", "-1"}, "--iters"},
		{[]string{"extra"}, "unexpected arguments"},
		{[]string{"--no-such-flag"}, "usage"},
	} {
		if _, _, err := parseFlags(tc.args, &bytes.Buffer{}); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: err = %v, want %q", tc.args, err, tc.want)
		}
	}
}

func TestPlanDevices(t *testing.T) {
	gpus := func(n int) func(int) error {
		return func(i int) error {
			if i >= n {
				return fmt.Errorf("device %d requested, %d present", i, n)
			}
			return nil
		}
	}
	for _, tc := range []struct {
		name    string
		o       Options
		gpus    int
		want    []int
		shared  bool
		wantErr string
	}{
		{"two ranks, one GPU", Options{Ranks: 2}, 1, []int{0, 0}, true, ""},
		{"four ranks, four GPUs", Options{Ranks: 4}, 8, []int{0, 1, 2, 3}, false, ""},
		{"four ranks, two GPUs", Options{Ranks: 4}, 2, []int{0, 1, 0, 1}, true, ""},
		{"one rank", Options{Ranks: 1}, 1, []int{0}, false, ""},
		{"no GPU", Options{Ranks: 2}, 0, nil, false, "needs a CUDA GPU"},
		{"explicit", Options{Ranks: 2, Devices: []int{1, 1}}, 2, []int{1, 1}, true, ""},
		{"explicit missing GPU", Options{Ranks: 2, Devices: []int{0, 3}}, 2, nil, false, "GPU 3"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			devs, shared, err := planDevices(tc.o, gpus(tc.gpus))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !errors.Is(err, ErrNoGPU) {
					t.Fatalf("err = %v, want %q wrapping ErrNoGPU", err, tc.wantErr)
				}
				return
			}
			if err != nil || !slices.Equal(devs, tc.want) || shared != tc.shared {
				t.Fatalf("planDevices = %v, %v, %v; want %v, %v", devs, shared, err, tc.want, tc.shared)
			}
		})
	}
}

func TestChildSpec(t *testing.T) {
	var id nccl.UniqueID
	for i := range id {
		id[i] = byte(i * 3)
	}
	c := childSpec{rank: 1, nranks: 4, device: 2, id: id}
	got, err := parseChildSpec(c.String())
	if err != nil || got != c {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	for _, bad := range []string{"", "1/2/0", "2/2/0/00", "x/2/0/00", "0/2/0/zz", "0/2/0/0011", "0/0/0/00", "0/2/-1/00"} {
		if _, err := parseChildSpec(bad); err == nil {
			t.Errorf("spec %q accepted", bad)
		}
	}
}

func TestItersFor(t *testing.T) {
	for _, tc := range []struct {
		o    Options
		size int64
		want int
	}{
		{Options{}, 10 << 10, 1000}, {Options{}, 640 << 10, 409}, {Options{}, 20 << 20, 50}, {Options{Iters: 7}, 20 << 20, 7},
	} {
		if got := itersFor(tc.o, tc.size); got != tc.want {
			t.Errorf("itersFor(%d bytes, iters %d) = %d, want %d", tc.size, tc.o.Iters, got, tc.want)
		}
	}
	if phase(64) != "decode" || phase(2048) != "prefill" {
		t.Error("phases")
	}
}

// TestNoGPU: without a GPU (or libnccl) the command fails at once with
// ErrNoGPU's message, starting no rank.
func TestNoGPU(t *testing.T) {
	if d, err := cuda.OpenDevice(0); err == nil {
		d.Close()
		t.Skip("a GPU is present")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out, errb bytes.Buffer
	err := Run(ctx, []string{"--ranks", "2"}, &out, &errb)
	if !errors.Is(err, ErrNoGPU) || !strings.Contains(err.Error(), "needs a CUDA GPU") || out.Len() != 0 {
		t.Fatalf("err = %v, stdout %q", err, out.String())
	}
	t.Log(err)
}

func TestLastJSONLine(t *testing.T) {
	out := "host:1:1 [0] NCCL INFO Bootstrap\n{\"ranks\":1}\nNCCL INFO comm destroyed\n"
	doc, other := lastJSONLine([]byte(out))
	if string(doc) != "{\"ranks\":1}\n" || string(other) != "host:1:1 [0] NCCL INFO Bootstrap\nNCCL INFO comm destroyed\n" {
		t.Fatalf("doc %q other %q", doc, other)
	}
	if doc, _ := lastJSONLine([]byte("no report\n")); doc != nil {
		t.Fatalf("doc %q from a rank that printed none", doc)
	}
}

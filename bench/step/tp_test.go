package step

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	collectivebench "github.com/glmtopo/glmtopo/bench/collective"
	"github.com/glmtopo/glmtopo/kernels/cuda"
)

// writeAllReduce writes a bench collective --json report of ranks ranks
// with one all-reduce p50 per batch of the 4096-wide bf16 hidden state.
func writeAllReduce(t *testing.T, ranks int, p50us map[int]float64) string {
	t.Helper()
	rep := collectivebench.Report{Ranks: ranks, DType: "bf16", Hidden: 4096}
	for b, us := range p50us {
		rep.Results = append(rep.Results, collectivebench.Result{Op: collectivebench.OpAllReduce, Batch: b,
			SizeBytes: int64(b) * 4096 * 2, P50us: us})
	}
	data, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "collective.json")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestTPFlagErrors(t *testing.T) {
	two := writeAllReduce(t, 2, map[int]float64{1: 8})
	bad := filepath.Join(t.TempDir(), "bad.json")
	if err := os.WriteFile(bad, []byte("not json"), 0o644); err != nil {
		t.Fatal(err)
	}
	air := []string{"--model", "synth:glm-4.5-air-fp8"}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--tensor-parallel-size", "-1"}, "want 1 or more"},
		{[]string{"--tensor-parallel-size", "x"}, "invalid value"},
		{[]string{"--enable-expert-parallel"}, "needs --tensor-parallel-size"},
		{[]string{"--tensor-parallel-size", "1", "--collective-json", two}, "runs no collective"},
		{[]string{"--tensor-parallel-size", "4", "--collective-json", two}, "measured 2 ranks"},
		{[]string{"--tensor-parallel-size", "2", "--collective-json", bad}, "not a `glmtopo bench collective --json` report"},
		{[]string{"--tensor-parallel-size", "2", "--collective-json", filepath.Join(t.TempDir(), "none.json")}, "no such file"},
		// Air has 8 KV heads: 3 neither divides nor is a multiple of them.
		{append([]string{"--tensor-parallel-size", "3"}, air...), "neither divides"},
		{[]string{"--floor-only", "--speculative-tokens", "1"}, "times nothing"},
		{[]string{"--floor-only", "--profile"}, "times nothing"},
		{[]string{"--floor-only", "--gpu", "nonesuch"}, "unknown GPU model"},
	} {
		var out, errb bytes.Buffer
		err := Run(context.Background(), c.args, &out, &errb)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: error %v, want %q", c.args, err, c.want)
		}
	}
}

// TestFloorOnly prints the floor of GLM-4.5-Air on 2 GPUs without building
// anything: with a GPU its HBM rate is measured, without one the catalog's;
// the all-reduces take the measured p50s.
func TestFloorOnly(t *testing.T) {
	ar := writeAllReduce(t, 2, map[int]float64{1: 8, 16: 9, 64: 12})
	args := []string{"--model", "synth:glm-4.5-air-fp8", "--layers", "4", "--batch", "1,16,64", "--floor-only",
		"--tensor-parallel-size", "2", "--enable-expert-parallel", "--collective-json", ar, "--gpu", "H100", "--json"}
	var out, errb bytes.Buffer
	if err := Run(context.Background(), args, &out, &errb); err != nil {
		t.Fatalf("%v (stderr %s)", err, errb.String())
	}
	var rep Report
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatalf("%v: %s", err, out.String())
	}
	tp := rep.TensorParallel
	if tp == nil || tp.Size != 2 || !tp.ExpertParallel || tp.Timed || len(tp.Floors) != 3 || len(rep.Results) != 0 {
		t.Fatalf("report %+v, tensor parallel %+v", rep, tp)
	}
	if !strings.Contains(tp.AllReduceRate, ar) || tp.ReadBW <= 0 {
		t.Errorf("all-reduce source %q, HBM %g B/s (%s)", tp.AllReduceRate, tp.ReadBW, tp.ReadBWSource)
	}
	if strings.Contains(tp.ReadBWSource, "catalog") && !strings.Contains(tp.ReadBWSource, "H100") {
		t.Errorf("no GPU: HBM rate from %q, want --gpu H100's", tp.ReadBWSource)
	}
	for i, want := range []struct {
		batch int
		p50   float64
	}{{1, 8e-6}, {16, 9e-6}, {64, 12e-6}} {
		f := tp.Floors[i]
		if f.Batch != want.batch || f.AllReduces != 2*4+1 || math.Abs(f.CollectiveSeconds-9*want.p50) > 1e-12 ||
			f.Measured != nil || f.ExpertsMeasured {
			t.Errorf("floor %d: %+v, want batch %d, 9 all-reduces of %g s", i, f, want.batch, want.p50)
		}
		if i > 0 && f.BytesPerGPU <= tp.Floors[i-1].BytesPerGPU {
			t.Errorf("batch %d reads %d bytes per GPU, batch %d %d: more sequences read more KV and experts",
				f.Batch, f.BytesPerGPU, tp.Floors[i-1].Batch, tp.Floors[i-1].BytesPerGPU)
		}
	}
	// The table prints the same floors.
	out.Reset()
	if err := Run(context.Background(), args[:len(args)-1], &out, &errb); err != nil {
		t.Fatal(err)
	}
	if s := out.String(); !strings.Contains(s, "tensor parallel 2, expert parallel") || strings.Count(s, "\n") < 6 {
		t.Errorf("table:\n%s", s)
	}
}

// TestFloorOnlyDefaultsToOneGPU: --floor-only alone is the one-GPU floor,
// which runs no collective.
func TestFloorOnlyDefaultsToOneGPU(t *testing.T) {
	var out, errb bytes.Buffer
	args := []string{"--model", "synth:glm-4.5-air", "--layers", "2", "--batch", "8", "--floor-only", "--gpu", "H200", "--json"}
	if err := Run(context.Background(), args, &out, &errb); err != nil {
		t.Fatal(err)
	}
	var rep Report
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatal(err)
	}
	tp := rep.TensorParallel
	if tp == nil || tp.Size != 1 || len(tp.Floors) != 1 || tp.Floors[0].AllReduces != 0 || tp.Floors[0].CollectiveSeconds != 0 || tp.AllReduceRate != "" {
		t.Errorf("tensor parallel %+v", tp)
	}
}

// TestNoGPUPrintsTheFloor: without a GPU, --tensor-parallel-size 4 (which
// is predicted, not timed) prints the floor instead of failing.
func TestNoGPUPrintsTheFloor(t *testing.T) {
	if be, err := cuda.New(cuda.Options{}); err == nil {
		be.Close()
		t.Skip("a GPU is present: the run would time the single-GPU steps")
	} else if !errors.Is(err, cuda.ErrNoCUDA) {
		t.Skipf("CUDA present but failing: %v", err)
	}
	var out, errb bytes.Buffer
	args := []string{"--model", "synth:glm-4.5-air-fp8", "--layers", "4", "--batch", "1,64", "--tensor-parallel-size", "4",
		"--enable-expert-parallel", "--json"}
	if err := Run(context.Background(), args, &out, &errb); err != nil {
		t.Fatal(err)
	}
	var rep Report
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatal(err)
	}
	tp := rep.TensorParallel
	if tp == nil || tp.Size != 4 || tp.Timed || len(tp.Floors) != 2 || !strings.Contains(tp.AllReduceRate, "catalog (H200 NVLink") ||
		!strings.Contains(errb.String(), "printing the floor on 4 GPUs only") {
		t.Errorf("tensor parallel %+v; stderr %s", tp, errb.String())
	}
}

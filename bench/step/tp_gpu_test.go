package step

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"testing"

	"github.com/glmtopo/glmtopo/kernels/cuda"
)

// TestOneRankBenchOnGPU runs bench step --tensor-parallel-size 1 on small
// shapes: every decode batch is timed plain and through the one-rank
// communicator, eagerly and from graphs, and its one-GPU floor carries the
// measured step. (The 3% budget is judged on GLM-4.5 shapes by
// scripts/gpu-tpone.sh, not on these.)
func TestOneRankBenchOnGPU(t *testing.T) {
	be, err := cuda.New(cuda.Options{})
	if errors.Is(err, cuda.ErrNoCUDA) {
		t.Skipf("no CUDA: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	be.Close()
	args := []string{"--model", "synth:glm-4.5-air-fp8", "--layers", "2", "--batch", "1,4", "--context", "64", "--prefill", "0",
		"--iters", "3", "--warmup", "1", "--tensor-parallel-size", "1", "--json"}
	var out, errb bytes.Buffer
	if err := Run(context.Background(), args, &out, &errb); err != nil {
		t.Fatalf("%v\n%s", err, errb.String())
	}
	var rep Report
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatal(err)
	}
	tp := rep.TensorParallel
	if tp == nil || tp.Size != 1 || !tp.Timed || len(tp.Floors) != 2 || len(rep.Results) != 2 {
		t.Fatalf("report: %d results, tensor parallel %+v", len(rep.Results), tp)
	}
	for i, r := range rep.Results {
		o, f := r.OneRank, tp.Floors[i]
		if o == nil || o.PlainGraphSeconds <= 0 || o.GraphSeconds <= 0 || o.EagerSeconds <= 0 || o.PlainEagerSeconds <= 0 ||
			o.StepSeconds != o.GraphSeconds || o.PlainStepSeconds != o.PlainGraphSeconds {
			t.Errorf("batch %d: one rank %+v", r.Batch, o)
			continue
		}
		if f.Batch != r.Batch || f.Measured == nil || f.Measured.StepSeconds != o.StepSeconds || !f.ExpertsMeasured || f.AllReduces != 0 {
			t.Errorf("batch %d: floor %+v", r.Batch, f)
		}
		t.Logf("batch %d: plain graph %.3f ms, one-rank graph %.3f ms (%+.2f%%); eager %.3f / %.3f ms; floor %.3f ms",
			r.Batch, o.PlainGraphSeconds*1e3, o.GraphSeconds*1e3, 100*o.Overhead, o.PlainEagerSeconds*1e3, o.EagerSeconds*1e3, f.FloorSeconds*1e3)
	}
}

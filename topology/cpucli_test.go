package topology

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
)

// TestRunPlanCPU: `glmtopo plan --cpu-stages N` reads the calibration file,
// takes the engine's serving defaults, and writes a plan file that parses.
func TestRunPlanCPU(t *testing.T) {
	cal := filepath.Join(t.TempDir(), "cpu.yaml")
	if err := unitSpec().WriteFile(cal); err != nil {
		t.Fatal(err)
	}
	out, _, err := runPlan(t, "--model", "tiny", "--cpu-stages", "2", "--cpu-calibration", cal, "--output", "json")
	if err != nil {
		t.Fatal(err)
	}
	res, err := ParsePlan([]byte(out))
	if err != nil {
		t.Fatal(err)
	}
	s := res.Settings
	if res.CPU == nil || len(res.Stages) != 2 || s.MaxNumSeqs != 256 || s.MaxNumBatchedTokens != 2048 || s.InputLen != 128 || s.OutputLen != 32 {
		t.Fatalf("plan: cpu %v, %d stages, settings %+v", res.CPU, len(res.Stages), s)
	}
	out, _, err = runPlan(t, "--model", "tiny", "--cpu-stages", "1", "--cpu-calibration", cal, "--max-num-seqs", "8", "--input-len", "64")
	if err != nil || !strings.Contains(out, "decode at 8 sequences (context 64+32/2)") {
		t.Fatalf("table: %v\n%s", err, out)
	}
	for _, tc := range []struct {
		args  []string
		error string
	}{
		{[]string{"--cpu-stages", "2", "--hosts", "1x8xH100", "--cpu-calibration", cal}, "--hosts does not apply"},
		{[]string{"--cpu-stages", "-1", "--cpu-calibration", cal}, "must not be negative"},
		{[]string{"--cpu-stages", "9", "--cpu-calibration", cal}, "9 stages"},
	} {
		args := append([]string{"--model", "tiny"}, tc.args...)
		if _, _, err := runPlan(t, args...); err == nil || !strings.Contains(err.Error(), tc.error) {
			t.Errorf("%v: err = %v, want %q", tc.args, err, tc.error)
		}
	}
	if testing.Short() {
		return // measuring takes seconds
	}
	// A calibration file that is not there yet is measured and cached.
	fresh := filepath.Join(t.TempDir(), "cache", "cpu.yaml")
	if _, _, err := runPlan(t, "--model", "tiny", "--cpu-stages", "2", "--cpu-calibration", fresh); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadCPUSpec(fresh); err != nil {
		t.Fatalf("not cached: %v", err)
	}
}

// TestMeasureCPU measures this machine: every figure valid, and a fan-out
// kernel call on all cores no slower than on one by more than noise.
func TestMeasureCPU(t *testing.T) {
	if testing.Short() {
		t.Skip("measures for seconds")
	}
	s, err := MeasureCPU(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	if s.parallelCores() < 1 || s.parallelCores() > float64(s.Cores) {
		t.Fatalf("parallel cores %g of %d", s.parallelCores(), s.Cores)
	}
	if s.WakeUS <= 0 || s.HopLatencyUS <= 0 {
		t.Fatalf("wake %g µs, hop %g µs", s.WakeUS, s.HopLatencyUS)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := MeasureCPU(ctx); err == nil {
		t.Fatal("a cancelled measurement succeeded")
	}
}

package main

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"
)

// TestGenerateTensorParallel: --tensor-parallel-size N (with and without
// --enable-expert-parallel) on the CPU generates one process's greedy
// tokens; too few GPUs, a GPU other than the first and bad sizes are
// refused with a clear error.
func TestGenerateTensorParallel(t *testing.T) {
	tiny := filepath.Join("..", "..", "testdata", "glm4moe", "tiny", "model")
	gen := func(extra ...string) (string, string, int) {
		var out, errb bytes.Buffer
		args := append([]string{"generate", "--model", tiny, "--prompt-ids", "5,17,300,2", "--max-new-tokens", "8", "--json"}, extra...)
		code := run(context.Background(), args, &out, &errb)
		return out.String(), errb.String(), code
	}
	want, stderr, code := gen()
	if code != 0 {
		t.Fatalf("one rank: exit %d: %s", code, stderr)
	}
	for _, flags := range [][]string{
		{"--tensor-parallel-size", "2"},
		{"--tensor-parallel-size", "4", "--enable-expert-parallel"},
		{"--tensor-parallel-size", "4", "--enable-expert-parallel", "--expert-dispatch", "alltoall"},
	} {
		got, stderr, code := gen(flags...)
		if code != 0 || got != want {
			t.Errorf("%v: exit %d, %q; one rank %q (%s)", flags, code, got, want, stderr)
		}
	}
	for _, tc := range []struct {
		flags []string
		want  string
	}{
		{[]string{"--tensor-parallel-size", "64", "--device", "cuda"}, "needs 64 GPUs"}, // more than any host here: says how many are visible
		{[]string{"--tensor-parallel-size", "2", "--device", "cuda:1"}, "GPUs 0..1"},
		{[]string{"--tensor-parallel-size", "0"}, "at least 1"},
		{[]string{"--tensor-parallel-size", "3"}, "attention heads"},
		{[]string{"--tensor-parallel-size", "2", "--expert-dispatch", "alltoall"}, "needs --enable-expert-parallel"},
		{[]string{"--expert-dispatch", "alltoall", "--enable-expert-parallel"}, "needs --enable-expert-parallel with --tensor-parallel-size"},
		{[]string{"--expert-dispatch", "scatter"}, `--expert-dispatch "scatter"`},
	} {
		_, stderr, code := gen(tc.flags...)
		if code == 0 || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want an error saying %q", tc.flags, code, stderr, tc.want)
		}
	}
}

package main

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
)

// generate takes the speculative flags in both of vLLM's spellings, and its
// greedy output is the golden one with MTP on.
func TestGenerateSpeculative(t *testing.T) {
	tiny := filepath.Join("..", "..", "testdata", "glm4moe", "tiny", "model")
	base := []string{"generate", "--model", tiny, "--prompt-ids", "686,901,64,205,863,307,349", "--max-new-tokens", "16", "--json"}
	want := "[594 594 594 594 594 594 594 594 594 594 360 95 986 421 204 90]" // golden.json greedy[1]
	for _, flags := range [][]string{
		{"--speculative-config", `{"method":"mtp","num_speculative_tokens":3}`},
		{"--speculative-config.method", "mtp", "--speculative-config.num_speculative_tokens", "1"},
	} {
		out, errs, code := runCLI(t, append(base, flags...)...)
		if code != 0 {
			t.Fatalf("%v: exit %d: %s", flags, code, errs)
		}
		var got struct{ IDs []int }
		if err := json.Unmarshal([]byte(out), &got); err != nil || fmt.Sprint(got.IDs) != want {
			t.Errorf("%v: %q (%v), want ids %s", flags, out, err, want)
		}
	}
	_, errs, code := runCLI(t, append(base, "--speculative-config.method", "eagle", "--speculative-config.num_speculative_tokens", "1")...)
	if code == 0 || !strings.Contains(errs, `method "eagle"`) {
		t.Errorf("an unknown method: exit %d, %q", code, errs)
	}
}

package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
)

// Every subcommand parses flags after its positional arguments: "-h" placed
// after one prints the command's flags (exit 0, nothing on stdout) instead of
// being taken for a positional argument or ignored.
func TestFlagsAfterPositionalsEveryCommand(t *testing.T) {
	for name := range commands() {
		t.Run(name, func(t *testing.T) {
			args := append(strings.Fields(name), "POSITIONAL", "-h")
			out, errs, code := runCLI(t, args...)
			if code != 0 || out != "" || !strings.Contains(strings.ToLower(errs), "usage") {
				t.Errorf("%q: exit %d, stdout %q, stderr %q; want exit 0 and the usage on stderr", args, code, out, errs)
			}
		})
	}
}

// A real flag after a positional takes effect (the README's form).
func TestModelInspectFlagAfterPositional(t *testing.T) {
	out, errs, code := runCLI(t, "model", "inspect", "tiny", "--json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	var s struct {
		Layers int `json:"num_hidden_layers"`
	}
	if err := json.Unmarshal([]byte(out), &s); err != nil || s.Layers != 4 {
		t.Fatalf("want JSON, got %q (%v)", out, err)
	}
}

func TestCLIRoughEdges(t *testing.T) {
	tiny := filepath.Join("..", "..", "testdata", "glm4moe", "tiny", "model")
	cases := []struct {
		args    []string
		code    int
		want    []string // each must appear in stdout+stderr
		notWant []string
	}{
		{nil, 2, []string{"usage: glmtopo <command>"}, nil},
		{[]string{"-h"}, 0, []string{"bench serve", "model inspect"}, []string{"CPU engine"}},
		{[]string{"bench", "-h"}, 0, []string{"bench serve", "bench step"}, []string{"unknown command", "model inspect"}},
		{[]string{"model", "--help"}, 0, []string{"model inspect", "model synth"}, []string{"unknown command"}},
		{[]string{"bench"}, 2, []string{"subcommand is required", "bench serve"}, nil},
		{[]string{"serve", "-h"}, 0, []string{"folder's name"}, []string{"[glm-4.5]", "CPU engine"}},
		{[]string{"generate", "-h"}, 0, []string{"-max-new-tokens"}, []string{"CPU engine"}},
		{[]string{"node", "-h"}, 0, []string{"-cluster-key-file FILE"}, []string{"-cluster-key-file glmtopo"}},
		{[]string{"generate", "--model", tiny, "--prompt-ids", "1,2", "--max-new-tokens", "0"}, 1, []string{"--max-new-tokens 0"}, nil},
		{[]string{"generate", "--model", tiny, "--prompt-ids", "1,2", "--max-new-tokens", "-5"}, 1, []string{"--max-new-tokens -5"}, nil},
		{[]string{"generate", "--model", tiny, "--prompt-ids", "1,2", "--temperature", "-1"}, 1, []string{"--temperature -1"}, []string{"{", "Temperature:"}},
		{[]string{"generate", "--model", tiny, "--prompt-ids", "1,2", "--top-p", "0"}, 1, []string{"--top-p 0"}, nil},
		{[]string{"model", "synth", "--layers", "-3", "--out", t.TempDir()}, 1, []string{"--layers -3"}, nil},
		{[]string{"plan", "--model", "tiny"}, 1, []string{"glmtopo plan: give exactly one"}, []string{"plan: plan:"}},
		{[]string{"version", "extra"}, 2, []string{"usage: glmtopo version"}, nil},
	}
	for _, c := range cases {
		out, errs, code := runCLI(t, c.args...)
		all := out + errs
		ok := code == c.code
		for _, w := range c.want {
			ok = ok && strings.Contains(all, w)
		}
		for _, w := range c.notWant {
			ok = ok && !strings.Contains(all, w)
		}
		if !ok {
			t.Errorf("%q: exit %d, output %q; want exit %d with %q and without %q", c.args, code, all, c.code, c.want, c.notWant)
		}
	}
}

// serve refuses --max-model-len above max_position_embeddings before loading
// anything (tiny has 4096 positions).
func TestServeRefusesMaxModelLenAboveModel(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var out, errs strings.Builder
	start := time.Now()
	code := run(ctx, []string{"serve", "--model", "tiny", "--load-format", "dummy", "--host", "127.0.0.1", "--port", "0", "--max-model-len", "32768"}, &out, &errs)
	if code != 1 || !strings.Contains(errs.String(), "max_position_embeddings 4096") || !strings.Contains(errs.String(), "--allow-long-max-model-len") {
		t.Fatalf("exit %d, stderr %q; want a refusal naming the limit and the override", code, errs.String())
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the refusal took %v", d)
	}
}

// A hostile config.json, of any value or size, makes every command that
// reads a model directory fail within 5 s and 1 GB of allocation. A config
// within bounds that does not describe the shards fails the commands that
// load them; inspect, plan and dummy weights only follow it (still within
// the bounds, or refused when the host cannot hold it).
func TestHostileConfigEveryCommand(t *testing.T) {
	base, err := os.ReadFile(filepath.Join("..", "..", "testdata", "glm4moe", "tiny", "model", "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	withFields := func(kv map[string]any) []byte {
		var m map[string]any
		if err := json.Unmarshal(base, &m); err != nil {
			t.Fatal(err)
		}
		for k, v := range kv {
			m[k] = v
		}
		b, _ := json.Marshal(m)
		return b
	}
	withField := func(k string, v any) []byte { return withFields(map[string]any{k: v}) }
	configs := map[string][]byte{
		"layers 1e9":  withField("num_hidden_layers", 1_000_000_000),
		"layers 1e6":  withField("num_hidden_layers", 1_000_000),
		"vocab 1e12":  withField("vocab_size", int64(1e12)),
		"experts 1e9": withField("n_routed_experts", 1_000_000_000),
		// In bounds, but not the tensors on disk (the tiny shards are copied in).
		"layers 1024 on tiny shards": withField("num_hidden_layers", 1024),
		"64 MB of spaces":            append(base, make([]byte, 64<<20)...),
		// Every field in bounds, together ~0.3T parameters: more than any test host holds.
		"huge in bounds": withFields(map[string]any{"hidden_size": 16384, "vocab_size": 1 << 21, "num_hidden_layers": 64,
			"n_routed_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 4096, "intermediate_size": 16384,
			"num_attention_heads": 128, "num_key_value_heads": 8, "head_dim": 128}),
	}
	for name, data := range configs {
		dir := t.TempDir()
		copyDir(t, filepath.Join("..", "..", "testdata", "glm4moe", "tiny", "model"), dir)
		if err := os.WriteFile(filepath.Join(dir, "config.json"), data, 0o644); err != nil {
			t.Fatal(err)
		}
		for _, args := range [][]string{
			{"model", "inspect", dir},
			{"generate", "--model", dir, "--prompt-ids", "1,2"},
			{"serve", "--model", dir, "--host", "127.0.0.1", "--port", "0"},
			{"plan", "--model", dir, "--hosts", "1x4xH100-80G"},
			{"generate", "--model", dir, "--load-format", "dummy", "--prompt-ids", "1,2"},
		} {
			if slices.Contains(args, "dummy") && strings.HasPrefix(name, "layers 1024") {
				continue // 1024 real tiny layers: dummy weights for them are legitimate work
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			start := time.Now()
			var out, errs strings.Builder
			code := run(ctx, args, &out, &errs)
			elapsed := time.Since(start)
			runtime.ReadMemStats(&after)
			cancel()
			// inspect and plan describe a config; dummy weights follow it, not the shards.
			describes := args[0] == "model" || args[0] == "plan" || slices.Contains(args, "dummy")
			inBounds := strings.HasPrefix(name, "layers 1024") || name == "huge in bounds"
			if code == 0 && !(describes && inBounds) {
				t.Errorf("%s: %q succeeded", name, args[:2])
			}
			if elapsed > 5*time.Second {
				t.Errorf("%s: %q took %v", name, args[:2], elapsed)
			}
			if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 1<<30 {
				t.Errorf("%s: %q allocated %d MB", name, args[:2], alloc>>20)
			}
		}
	}
}

func copyDir(t *testing.T, from, to string) {
	t.Helper()
	entries, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, e.Name()), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

package topology

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

func runPlan(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	err := RunPlan(context.Background(), args, &out, &errb)
	return out.String(), errb.String(), err
}

// The JSON plan file carries the contract's fields.
func TestRunPlanJSONContract(t *testing.T) {
	out, _, err := runPlan(t, "--model", "glm-4.5-air-fp8", "--hosts", "1x4xH100-80G", "--max-num-seqs", "8", "--output", "json")
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"feasible", "reason", "stages", "memory", "experts", "predicted", "alternatives"} {
		if _, ok := m[k]; !ok {
			t.Errorf("missing %q", k)
		}
	}
	if m["feasible"] != true {
		t.Fatalf("not feasible: %v", m["reason"])
	}
	stage := m["stages"].([]any)[0].(map[string]any)
	for _, k := range []string{"host", "gpus", "layers", "tp", "ep", "embedding", "lm_head", "mtp"} {
		if _, ok := stage[k]; !ok {
			t.Errorf("stage misses %q", k)
		}
	}
	pred := m["predicted"].(map[string]any)
	for _, k := range []string{"decode_tokens_per_s", "tpot_ms", "ttft_ms", "max_concurrency", "kv_tokens", "bottleneck"} {
		if _, ok := pred[k]; !ok {
			t.Errorf("predicted misses %q", k)
		}
	}
	if len(m["experts"].([]any)) == 0 {
		t.Error("an EP plan must list its expert placement")
	}
	var res PlanResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("plan file does not load back: %v", err)
	}
	if res.Stages[len(res.Stages)-1].Layers[1] != 46 || !res.Stages[0].Embedding {
		t.Errorf("loaded stages %+v", res.Stages)
	}
}

func TestRunPlanFormatsAndFiles(t *testing.T) {
	dir := t.TempDir()
	inv := filepath.Join(dir, "hosts.yaml")
	os.WriteFile(inv, []byte(`hosts:
  - {name: gpu-a, gpu: H200, gpus: 4, nics: [{name: ib0, rdma: true, gbps: 400}]}
  - {name: gpu-b, gpu: H100-80G, gpus: 4, nics: [{name: ib0, rdma: true, gbps: 400}]}
`), 0o644)
	cal := filepath.Join(dir, "cal.yaml")
	os.WriteFile(cal, []byte("gpus:\n  H200: {hbm: 0.85}\n"), 0o644)
	load := filepath.Join(dir, "load.json")
	os.WriteFile(load, []byte(`{"layers": {"10": [`+strings.Repeat("1,", 159)+`500]}}`), 0o644)
	base := []string{"--model", "glm-4.5-fp8", "--inventory", inv, "--calibration", cal, "--expert-load", load}

	table, _, err := runPlan(t, base...)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"FITS", "gpu-a", "gpu-b", "decode", "bottleneck", "alternatives"} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, table)
		}
	}
	y, _, err := runPlan(t, append(base, "--output", "yaml")...)
	if err != nil {
		t.Fatal(err)
	}
	var ym map[string]any
	if err := yaml.Unmarshal([]byte(y), &ym); err != nil || ym["feasible"] != true {
		t.Fatalf("yaml: %v %v", err, ym["feasible"])
	}
	svgPath := filepath.Join(dir, "plan.svg")
	if out, _, err := runPlan(t, append(base, "--output", "svg", "--out", svgPath)...); err != nil || out != "" {
		t.Fatalf("svg to file: %v (stdout %q)", err, out)
	}
	svg, _ := os.ReadFile(svgPath)
	dec := xml.NewDecoder(bytes.NewReader(svg))
	for {
		if _, err := dec.Token(); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("svg is not well-formed XML: %v", err)
		}
	}
	for _, want := range []string{"<svg", "gpu-a", "gpu-b", "stage 0", "GPU 3", "RDMA"} {
		if !bytes.Contains(svg, []byte(want)) {
			t.Errorf("svg lacks %q", want)
		}
	}
}

func TestRunPlanInfeasible(t *testing.T) {
	out, _, err := runPlan(t, "--model", "glm-4.5", "--hosts", "2x4xH100-80G", "--max-num-seqs", "4")
	if !errors.Is(err, ErrInfeasible) {
		t.Fatalf("err = %v, want ErrInfeasible", err)
	}
	for _, want := range []string{"DOES NOT FIT", "GiB over", "Would fit with", "glm-4.5-fp8", "3 hosts"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

func TestRunPlanErrors(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"--model", "tiny"}, "exactly one of --hosts or --inventory"},
		{[]string{"--hosts", "1x1xH100", "--inventory", "x.yaml"}, "exactly one"},
		{[]string{"--hosts", "1x1xH100", "--output", "pdf"}, "table, json, yaml, svg"},
		{[]string{"--hosts", "1x1xH100", "--model", "glm-9"}, "neither a preset"},
		{[]string{"--hosts", "1x1xV100"}, "unknown GPU model"},
		{[]string{"--hosts", "1x1xH100", "--kv-cache-dtype", "int8"}, "auto, bf16, fp8"},
		{[]string{"--hosts", "1x1xH100", "--max-model-len", "0"}, "must be positive"},
		{[]string{"--inventory", "/nonexistent/hosts.yaml"}, "no such file"},
		{[]string{"--hosts", "1x1xH100", "--bogus"}, "flag provided but not defined"},
		{[]string{"--hosts", "1x1xH100", "extra"}, "unexpected arguments"},
	}
	for _, c := range cases {
		_, _, err := runPlan(t, c.args...)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: err = %v, want %q", c.args, err, c.want)
		}
	}
}

// The plan file loads back, from JSON and YAML, to the same plan.
func TestPlanFileRoundTrip(t *testing.T) {
	dir := t.TempDir()
	for _, format := range []string{"json", "yaml"} {
		path := filepath.Join(dir, "plan."+format)
		if _, _, err := runPlan(t, "--model", "glm-4.5-air-fp8", "--hosts", "1x4xH100-80G", "--output", format, "--out", path); err != nil {
			t.Fatal(err)
		}
		res, err := LoadPlan(path)
		if err != nil {
			t.Fatalf("%s: %v", format, err)
		}
		if !res.Feasible || len(res.Stages) != 1 || res.Stages[0].EP != 4 || len(res.Experts) != 46 || len(res.Memory) != 4 {
			t.Errorf("%s: loaded %+v", format, res.Stages)
		}
		var buf bytes.Buffer
		if err := res.WriteTable(&buf); err != nil || !strings.Contains(buf.String(), "FITS") {
			t.Errorf("%s: table of a loaded plan: %v", format, err)
		}
	}
	if _, err := ParsePlan([]byte(`{"feasible": true, "stages": [], "bogus": 1}`)); err == nil {
		t.Error("unknown field accepted")
	}
}

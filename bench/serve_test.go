package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// tokenCountingServer answers completions with three tokens and reports prompt_tokens as the
// given tokenizer counts the prompt.
func tokenCountingServer(t *testing.T, tok Tokenizer) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			Prompt string `json:"prompt"`
		}
		if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
			http.Error(w, err.Error(), 400)
			return
		}
		for range 3 {
			fmt.Fprint(w, `data: {"choices":[{"index":0,"text":"x","finish_reason":null}]}`+"\n\n")
		}
		fmt.Fprintf(w, `data: {"choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":3}}`+"\n\ndata: [DONE]\n\n", len(tok.Encode(body.Prompt)))
	}))
	t.Cleanup(srv.Close)
	return srv
}

// TestRunServeTokenExactWithProjectTokenizer runs the command with the fixture GLM-4.5-style
// tokenizer: the prompts are exactly --random-input-len tokens as the server counts them.
func TestRunServeTokenExactWithProjectTokenizer(t *testing.T) {
	const tokDir = "../testdata/text/tokenizer"
	if _, err := os.Stat(filepath.Join(tokDir, "tokenizer.json")); err != nil {
		t.Skipf("fixture tokenizer missing: %v", err)
	}
	tok, err := loadProjectTokenizer(tokDir)
	if err != nil {
		t.Fatal(err)
	}
	srv := tokenCountingServer(t, tok)
	dir := t.TempDir()
	var stdout, stderr bytes.Buffer
	args := strings.Fields("--model glm --dataset-name random --random-input-len 300 --random-output-len 3 " +
		"--num-prompts 6 --ignore-eos --disable-tqdm --save-result --result-filename r.json --tokenizer " + tokDir)
	args = append(args, "--base-url", srv.URL, "--result-dir", dir)
	if err := RunServe(context.Background(), args, &stdout, &stderr); err != nil {
		t.Fatalf("RunServe: %v\n%s", err, stderr.String())
	}
	if strings.Contains(stderr.String(), "WARNING") {
		t.Errorf("unexpected warning:\n%s", stderr.String())
	}
	b, err := os.ReadFile(filepath.Join(dir, "r.json"))
	if err != nil {
		t.Fatal(err)
	}
	var res map[string]any
	if err := json.Unmarshal(b, &res); err != nil {
		t.Fatal(err)
	}
	if res["total_input_tokens"] != 1800.0 || res["total_output_tokens"] != 18.0 || res["tokenizer_id"] != tokDir {
		t.Errorf("result: input %v output %v tokenizer %v", res["total_input_tokens"], res["total_output_tokens"], res["tokenizer_id"])
	}
	if !strings.Contains(stdout.String(), "Serving Benchmark Result") {
		t.Errorf("no summary:\n%s", stdout.String())
	}
}

func TestRunServeErrors(t *testing.T) {
	failLoad := func(string) (Tokenizer, error) { return nil, fmt.Errorf("no such tokenizer") }
	for _, tc := range []struct{ args, want string }{
		{"--num-prompts 0", "num-prompts"},
		{"--tokenizer /nonexistent", "no such tokenizer"},
	} {
		err := runServe(context.Background(), strings.Fields(tc.args), &bytes.Buffer{}, &bytes.Buffer{}, failLoad, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v", tc.args, err)
		}
	}
	var help bytes.Buffer
	if err := runServe(context.Background(), []string{"-h"}, &help, &help, failLoad, nil); err != nil || !strings.Contains(help.String(), "-random-input-len") {
		t.Errorf("help: %v\n%s", err, help.String())
	}
}

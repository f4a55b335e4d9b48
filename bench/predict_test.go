package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/glmtopo/glmtopo/bench/serving"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/topology"
)

// threeTokenServer streams three tokens per completion and counts requests.
func threeTokenServer(t *testing.T, calls *atomic.Int64) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		for range 3 {
			fmt.Fprint(w, `data: {"choices":[{"index":0,"text":"x","finish_reason":null}]}`+"\n\n")
		}
		fmt.Fprint(w, `data: {"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":3}}`+"\n\ndata: [DONE]\n\n")
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestRunServePredictFromPlan(t *testing.T) {
	var calls atomic.Int64
	srv := threeTokenServer(t, &calls)
	var asked serving.Shape
	plans := func(path string) (serving.Predictor, error) {
		if path != "plan.json" {
			return nil, errors.New("no such plan")
		}
		return func(s serving.Shape) (*serving.Prediction, error) {
			asked = s
			return &serving.Prediction{Source: "fake", OutputTokensPerS: 1e9, MeanTPOTMs: 1}, nil
		}, nil
	}
	noTok := func(string) (Tokenizer, error) { return nil, errors.New("unused") }
	args := strings.Fields("--model m --dataset-name random --random-input-len 10 --random-output-len 3 --num-prompts 4 " +
		"--max-concurrency 2 --disable-tqdm --base-url " + srv.URL)
	var out bytes.Buffer
	if err := runServeWith(context.Background(), append(args, "--predict-from-plan", "plan.json"), &out, &bytes.Buffer{}, noTok, plans, nil); err != nil {
		t.Fatal(err)
	}
	if asked != (serving.Shape{Concurrency: 2, NumPrompts: 4, InputLen: 10, OutputLen: 3}) {
		t.Errorf("predicted for %+v", asked)
	}
	if s := out.String(); !strings.Contains(s, "Measured vs Predicted") || !strings.Contains(s, "Prediction:                       fake") {
		t.Errorf("no comparison:\n%s", s)
	}
	// A plan that cannot be read fails before any request is sent.
	before := calls.Load()
	err := runServeWith(context.Background(), append(args, "--predict-from-plan", "other.json"), &bytes.Buffer{}, &bytes.Buffer{}, noTok, plans, nil)
	if err == nil || !strings.Contains(err.Error(), "no such plan") || calls.Load() != before {
		t.Errorf("bad plan: %v after %d requests", err, calls.Load()-before)
	}
}

// TestLoadPlanPredictor reads a CPU plan of the tiny preset from its file
// and predicts a shape with it; a plan without a CPU section is refused.
func TestLoadPlanPredictor(t *testing.T) {
	cfg, err := model.Preset("tiny")
	if err != nil {
		t.Fatal(err)
	}
	spec := topology.CPUSpec{Cores: 2, GEMMGFLOPS: 10, GEMMCoreGFLOPS: 5, ConvGElems: 1, ConvCoreGElems: 0.5, GEMVGBps: 5,
		GEMVCoreGBps: 3, AttnGFLOPS: 4, AttnCoreGFLOPS: 2, OpOverheadUS: 5, LayerWorkFactor: 1, ElemNS: 1, SampleNS: 40,
		StepOverheadUS: 1, HopLatencyUS: 10, HopGBps: 5, WakeUS: 20}
	res, err := topology.PlanCPU(topology.CPUPlanRequest{Model: cfg, ModelName: "tiny", Spec: spec, Stages: 2})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	write := func(name string, v any) string {
		data, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return path
	}
	predict, err := loadPlanPredictor(write("cpu.json", res))
	if err != nil {
		t.Fatal(err)
	}
	p, err := predict(serving.Shape{Concurrency: 4, NumPrompts: 16, InputLen: 128, OutputLen: 32})
	if err != nil || !(p.OutputTokensPerS > 0) || !(p.MeanTPOTMs > 0) || !strings.Contains(p.Source, "2 CPU stage(s)") {
		t.Fatalf("prediction %+v, %v", p, err)
	}
	res.CPU = nil
	if _, err := loadPlanPredictor(write("gpu.json", res)); err == nil || !strings.Contains(err.Error(), "not a CPU plan") {
		t.Fatalf("plan without a CPU section: %v", err)
	}
}

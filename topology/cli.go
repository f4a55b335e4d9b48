package topology

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"go.yaml.in/yaml/v3"

	"github.com/glmtopo/glmtopo/model"

	"github.com/glmtopo/glmtopo/internal/cliflag"
)

// ErrInfeasible is returned by RunPlan after it wrote a plan that does not
// fit; the output already says why, so callers only set the exit status.
var ErrInfeasible = errors.New("plan: the model does not fit these hosts")

// RunPlan is `glmtopo plan`: it parses flags, plans, and writes the result.
func RunPlan(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("plan", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		modelName   = fs.String("model", "glm-4.5-fp8", "preset ("+strings.Join(model.PresetNames(), ", ")+") or checkpoint directory")
		hosts       = fs.String("hosts", "", "hosts shorthand, e.g. 2x4xH100-80G or 1x4xH200,1x4xH100-80G")
		invPath     = fs.String("inventory", "", "inventory YAML file (hosts, GPUs, interconnect, NICs)")
		maxLen      = fs.Int("max-model-len", 8192, "longest sequence (prompt + output) in tokens")
		maxSeqs     = fs.Int("max-num-seqs", 32, "concurrent sequences; the KV cache must hold max-num-seqs × max-model-len tokens")
		batched     = fs.Int("max-num-batched-tokens", 8192, "tokens per forward pass (prefill chunk; sizes activations)")
		kvDType     = fs.String("kv-cache-dtype", "auto", "KV cache dtype: auto (bf16), bf16, fp8 or fp8_e4m3")
		util        = fs.Float64("gpu-memory-utilization", 0.9, "fraction of each GPU's memory the engine may use")
		reserveGiB  = fs.Float64("runtime-reserve-gib", 2, "per-GPU memory for CUDA context, cuBLAS/NCCL workspaces and graphs")
		loadPath    = fs.String("expert-load", "", "YAML/JSON of per-layer per-expert token counts (layers: {L: [...]})")
		redundant   = fs.Int("redundant-experts", -1, "extra physical experts per MoE layer of an EP stage (0 or -1: one per GPU with --expert-load, else none)")
		epMode      = fs.String("expert-parallel", "auto", "routed experts: auto, on (always EP), off (always TP)")
		acceptance  = fs.Float64("mtp-acceptance", 0.9, "MTP draft acceptance rate")
		specTokens  = fs.Int("num-speculative-tokens", 1, "MTP draft tokens per step (0 disables MTP)")
		stepRatio   = fs.Float64("mtp-step-ratio", 0, "measured speculative step time over plain decode ('glmtopo bench step --speculative-tokens': full_depth_step_ratio); 0: modelled")
		inputLen    = fs.Int("input-len", 1024, "prompt length for the TTFT and decode-context predictions")
		outputLen   = fs.Int("output-len", 1024, "output length for the decode-context prediction")
		calPath     = fs.String("calibration", "", "calibration file written by 'glmtopo bench' (efficiency overrides)")
		output      = fs.String("output", "table", "output format: table, json, yaml or svg")
		outPath     = fs.String("out", "", "write the output to FILE instead of stdout")
		alternative = fs.Int("alternatives", 4, "number of alternative configurations to list")
		overrides   = fs.String("hf-overrides", "", `JSON object merged into the model's config, e.g. '{"num_hidden_layers": 30}' (as serve's)`)
		cpuFlags    = addCPUPlanFlags(fs) // cpucli.go
	)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: glmtopo plan --model NAME|DIR (--hosts SPEC | --inventory FILE) [flags]")
		fmt.Fprintln(stderr, "Plans fit, placement and predicted throughput of a GLM-4.5-class model on a set of hosts.")
		fs.PrintDefaults()
	}
	if err := cliflag.Parse(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("plan: unexpected arguments %q", fs.Args())
	}
	switch *output {
	case "table", "json", "yaml", "svg":
	default:
		return fmt.Errorf("plan: --output %q is unknown (table, json, yaml, svg)", *output)
	}
	if cpuFlags.active() {
		res, err := cpuFlags.plan(ctx, fs, *modelName, *overrides, *maxSeqs, *batched, *maxLen, *inputLen, *outputLen, stderr)
		if err != nil || res == nil {
			return err
		}
		return writePlan(res, *output, *outPath, stdout)
	}
	if (*hosts == "") == (*invPath == "") {
		return errors.New("plan: give exactly one of --hosts or --inventory")
	}
	if *alternative < 0 || *alternative > 64 {
		return errors.New("plan: --alternatives must be 0..64")
	}
	if *reserveGiB < 0 || *reserveGiB > 64 {
		return errors.New("plan: --runtime-reserve-gib must be 0..64")
	}
	if *specTokens < 0 {
		return errors.New("plan: --num-speculative-tokens must not be negative")
	}
	if *acceptance < 0 || *acceptance > 1 {
		return fmt.Errorf("plan: --mtp-acceptance %g is outside [0, 1]", *acceptance)
	}
	cfg, err := model.Resolve(*modelName)
	if err != nil {
		return fmt.Errorf("plan: %w", err)
	}
	if *overrides != "" {
		if cfg, err = cfg.WithOverrides(*overrides); err != nil {
			return fmt.Errorf("plan: --hf-overrides: %w", err)
		}
	}
	var inv Inventory
	if *hosts != "" {
		inv, err = ParseHosts(*hosts)
	} else {
		inv, err = LoadInventory(*invPath)
	}
	if err != nil {
		return fmt.Errorf("plan: %w", err)
	}
	req := PlanRequest{
		Model: cfg, ModelName: *modelName, Inventory: inv,
		MaxModelLen: *maxLen, MaxNumSeqs: *maxSeqs, MaxNumBatchedTokens: *batched,
		KVCacheDType: *kvDType, GPUMemoryUtil: *util, RuntimeReserve: int64(*reserveGiB * (1 << 30)),
		RedundantExperts: *redundant, ExpertParallel: *epMode,
		DisableMTP: *specTokens == 0, SpeculativeTokens: *specTokens, MTPAcceptance: *acceptance, MTPStepRatio: *stepRatio,
		InputLen: *inputLen, OutputLen: *outputLen, MaxAlternatives: *alternative,
	}
	if *acceptance == 0 {
		req.DisableMTP = true // nothing is ever accepted: MTP only costs
	}
	if *reserveGiB == 0 {
		req.RuntimeReserve = -1 // zero means "default" in PlanRequest
	}
	if *alternative == 0 {
		req.MaxAlternatives = -1
	}
	if *maxLen <= 0 || *maxSeqs <= 0 || *batched <= 0 || *inputLen <= 0 || *outputLen <= 0 || *util <= 0 {
		return errors.New("plan: --max-model-len, --max-num-seqs, --max-num-batched-tokens, --input-len, --output-len and --gpu-memory-utilization must be positive")
	}
	if *loadPath != "" {
		if req.ExpertLoad, err = LoadExpertLoad(*loadPath); err != nil {
			return fmt.Errorf("plan: %w", err)
		}
	}
	if *calPath != "" {
		if req.Calibration, err = LoadCalibration(*calPath); err != nil {
			return fmt.Errorf("plan: %w", err)
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	res, err := Plan(req)
	if err != nil {
		return err
	}
	return writePlan(res, *output, *outPath, stdout)
}

// writePlan renders res as output (table, json, yaml, svg) to outPath or stdout.
func writePlan(res *PlanResult, output, outPath string, stdout io.Writer) error {
	var buf bytes.Buffer
	var err error
	switch output {
	case "table":
		err = res.WriteTable(&buf)
	case "json":
		enc := json.NewEncoder(&buf)
		enc.SetIndent("", "  ")
		err = enc.Encode(res)
	case "yaml":
		enc := yaml.NewEncoder(&buf)
		enc.SetIndent(2)
		if err = enc.Encode(res); err == nil {
			err = enc.Close()
		}
	case "svg":
		err = res.WriteSVG(&buf)
	}
	if err != nil {
		return fmt.Errorf("plan: render %s: %w", output, err)
	}
	if outPath != "" {
		if err := os.WriteFile(outPath, buf.Bytes(), 0o644); err != nil {
			return fmt.Errorf("plan: %w", err)
		}
	} else if _, err := stdout.Write(buf.Bytes()); err != nil {
		return err
	}
	if !res.Feasible {
		return ErrInfeasible
	}
	return nil
}

// ParsePlan reads a plan file written by `glmtopo plan --output json|yaml`.
func ParsePlan(data []byte) (*PlanResult, error) {
	var res PlanResult
	trimmed := bytes.TrimSpace(data)
	var err error
	if len(trimmed) > 0 && trimmed[0] == '{' {
		dec := json.NewDecoder(bytes.NewReader(trimmed))
		dec.DisallowUnknownFields()
		err = dec.Decode(&res)
	} else {
		dec := yaml.NewDecoder(bytes.NewReader(trimmed))
		dec.KnownFields(true)
		err = dec.Decode(&res)
	}
	if err != nil {
		return nil, fmt.Errorf("plan file: %w", err)
	}
	if res.Feasible && len(res.Stages) == 0 {
		return nil, errors.New("plan file: feasible but without stages")
	}
	return &res, nil
}

// LoadPlan reads a plan file.
func LoadPlan(path string) (*PlanResult, error) { return loadFile(path, "plan", ParsePlan) }

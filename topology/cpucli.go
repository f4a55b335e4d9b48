package topology

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"go.yaml.in/yaml/v3"

	"github.com/glmtopo/glmtopo/model"
)

// cpuPlanFlags are `glmtopo plan`'s flags for the CPU engine.
type cpuPlanFlags struct {
	stages, machines, micro *int
	calPath                 *string
	calibrate               *bool
}

func addCPUPlanFlags(fs *flag.FlagSet) cpuPlanFlags {
	return cpuPlanFlags{
		stages:   fs.Int("cpu-stages", 0, "plan the CPU engine: this many pipeline stages (daemons), layers split as hosts without GPUs split them"),
		machines: fs.Int("cpu-machines", 1, "machines the CPU stages run on (1: all on this one, sharing its cores, as 'make run')"),
		micro:    fs.Int("cpu-micro-batches", 0, "micro-batches in the ring (0: one per stage, as --pipeline-micro-batches -1)"),
		calPath: fs.String("cpu-calibration", "", "CPU calibration file: read if present, else measured here and written "+
			"(default: the user cache directory's glmtopo/cpu-calibration.yaml)"),
		calibrate: fs.Bool("calibrate-cpu", false, "measure this machine's CPU backend (about 2 s) and write the calibration, even if cached"),
	}
}

func (f cpuPlanFlags) active() bool { return *f.stages != 0 || *f.calibrate }

// spec loads the cached calibration or measures and caches it.
func (f cpuPlanFlags) spec(ctx context.Context, stderr io.Writer) (CPUSpec, string, error) {
	path := *f.calPath
	if path == "" {
		dir, err := os.UserCacheDir()
		if err != nil {
			return CPUSpec{}, "", fmt.Errorf("plan: no --cpu-calibration and no cache directory: %w", err)
		}
		path = filepath.Join(dir, "glmtopo", "cpu-calibration.yaml")
	}
	if !*f.calibrate {
		s, err := LoadCPUSpec(path)
		if err == nil {
			return s, path, nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			return s, path, fmt.Errorf("plan: %w", err)
		}
	}
	fmt.Fprintf(stderr, "plan: measuring this machine's CPU backend into %s\n", path)
	s, err := MeasureCPU(ctx)
	if err != nil {
		return s, path, fmt.Errorf("plan: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return s, path, fmt.Errorf("plan: %w", err)
	}
	return s, path, s.WriteFile(path)
}

// plan is `glmtopo plan --cpu-stages N` (or `--calibrate-cpu` alone, which
// prints the calibration and returns no plan). Flags left at `glmtopo
// plan`'s GPU defaults take the CPU engine's serving defaults instead.
func (f cpuPlanFlags) plan(ctx context.Context, fs *flag.FlagSet, modelName, overrides string, maxSeqs, batched, maxLen, inputLen, outputLen int,
	stderr io.Writer) (*PlanResult, error) {
	if *f.stages < 0 {
		return nil, fmt.Errorf("plan: --cpu-stages %d must not be negative", *f.stages)
	}
	spec, path, err := f.spec(ctx, stderr)
	if err != nil {
		return nil, err
	}
	if *f.stages == 0 {
		out, err := yaml.Marshal(spec)
		if err != nil {
			return nil, err
		}
		fmt.Fprintf(stderr, "plan: CPU calibration written to %s:\n%s", path, out)
		return nil, nil
	}
	set := map[string]bool{}
	fs.Visit(func(fl *flag.Flag) { set[fl.Name] = true })
	for _, name := range []string{"hosts", "inventory", "calibration", "expert-load"} {
		if set[name] {
			return nil, fmt.Errorf("plan: --%s does not apply to a CPU plan (--cpu-stages)", name)
		}
	}
	pick := func(name string, v int) int {
		if set[name] {
			return v
		}
		return 0 // the CPU plan's default
	}
	cfg, err := model.Resolve(modelName)
	if err != nil {
		return nil, fmt.Errorf("plan: %w", err)
	}
	if overrides != "" {
		if cfg, err = cfg.WithOverrides(overrides); err != nil {
			return nil, fmt.Errorf("plan: --hf-overrides: %w", err)
		}
	}
	return PlanCPU(CPUPlanRequest{Model: cfg, ModelName: modelName, Spec: spec, Stages: *f.stages, Machines: *f.machines,
		MicroBatches: *f.micro, MaxNumSeqs: pick("max-num-seqs", maxSeqs), MaxNumBatchedTokens: pick("max-num-batched-tokens", batched),
		MaxModelLen: pick("max-model-len", maxLen), InputLen: pick("input-len", inputLen), OutputLen: pick("output-len", outputLen)})
}

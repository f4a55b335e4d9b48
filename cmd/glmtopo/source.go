package main

import (
	"flag"

	"github.com/glmtopo/glmtopo/parallel"
)

// sourceFlags are the flags that name a model the way vLLM's do: --model
// (a checkpoint directory, or a preset with --load-format dummy),
// --load-format and --hf-overrides. generate, serve, stage and node share them.
type sourceFlags struct {
	path, loadFormat, overrides *string
}

// addSourceFlags registers them on fs; modelHelp "" leaves --model to the
// caller (node takes it from the daemon's own flags).
func addSourceFlags(fs *flag.FlagSet, modelHelp string) sourceFlags {
	var s sourceFlags
	if modelHelp != "" {
		s.path = fs.String("model", "", modelHelp)
	}
	s.loadFormat = fs.String("load-format", "auto", "auto (the checkpoint) or dummy (generated weights of the config's shapes, as vLLM's)")
	s.overrides = fs.String("hf-overrides", "", `JSON object merged into config.json, e.g. '{"num_hidden_layers": 4}' (as vLLM's)`)
	return s
}

// at is the model source for the checkpoint or preset at path.
func (s sourceFlags) at(path string) parallel.ModelSource {
	return parallel.ModelSource{Path: path, LoadFormat: *s.loadFormat, HFOverrides: *s.overrides}
}

// source is the model source --model names.
func (s sourceFlags) source() parallel.ModelSource { return s.at(*s.path) }

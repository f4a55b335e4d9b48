package main

import (
	"flag"
	"io"
	"strings"
	"testing"
)

// --pipeline-link: a bad value is a usage error that names the choices;
// the node daemon and a head default to tcp, a stage to auto (the head's
// choice).
func TestPipelineLinkFlag(t *testing.T) {
	out, errs, code := runCLI(t, "stage", "--model", "tiny", "--load-format", "dummy", "--layers", "2:4",
		"--next", "127.0.0.1:1", "--cluster-key-file", "/nonexistent", "--pipeline-link", "rdma")
	if code != 2 || !strings.Contains(out+errs, "want tcp, nccl or auto") {
		t.Errorf("stage --pipeline-link rdma: exit %d, output %q", code, out+errs)
	}
	for _, c := range []struct {
		name string
		add  func(fs *flag.FlagSet)
		want string
	}{
		{"node", func(fs *flag.FlagSet) { new(nodeRuntime).AddFlags(fs) }, "tcp"},
		{"serve", func(fs *flag.FlagSet) { addPipelineFlags(fs) }, "tcp"},
	} {
		fs := flag.NewFlagSet(c.name, flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		c.add(fs)
		f := fs.Lookup("pipeline-link")
		if f == nil || f.DefValue != c.want {
			t.Errorf("%s --pipeline-link: %+v, want default %q", c.name, f, c.want)
		}
	}
}

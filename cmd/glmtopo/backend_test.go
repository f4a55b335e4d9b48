package main

import (
	"flag"
	"io"
	"strings"
	"testing"
)

// TestBackendFlags: --fast-gemm defaults to bf16 activations (as vLLM runs)
// and turns off with --fast-gemm=false; bad devices are clear errors.
func TestBackendFlags(t *testing.T) {
	for _, c := range []struct {
		args []string
		fast bool
	}{{nil, true}, {[]string{"--fast-gemm=false"}, false}, {[]string{"--fast-gemm"}, true}} {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		bf := addBackendFlags(fs)
		if err := fs.Parse(c.args); err != nil {
			t.Fatal(err)
		}
		if *bf.fastGemm != c.fast || *bf.device != "cpu" {
			t.Errorf("%v: fast-gemm %v device %q, want %v cpu", c.args, *bf.fastGemm, *bf.device, c.fast)
		}
	}
	for _, dev := range []string{"cuda:x", "cuda:-1", "tpu"} {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		bf := addBackendFlags(fs)
		if err := fs.Parse([]string{"--device", dev}); err != nil {
			t.Fatal(err)
		}
		if _, _, err := bf.open(); err == nil || !strings.Contains(err.Error(), "--device") {
			t.Errorf("--device %s: err %v, want one naming --device", dev, err)
		}
	}
}

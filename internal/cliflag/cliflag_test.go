package cliflag

import (
	"flag"
	"io"
	"slices"
	"testing"
)

func TestParseFlagsAnywhere(t *testing.T) {
	cases := []struct {
		args    []string
		json    bool
		out     string
		wantPos []string
	}{
		{[]string{"DIR", "--json"}, true, "", []string{"DIR"}},
		{[]string{"--json", "DIR"}, true, "", []string{"DIR"}},
		{[]string{"A", "--out", "F", "B", "--json"}, true, "F", []string{"A", "B"}},
		{[]string{"A", "--", "--json", "-x"}, false, "", []string{"A", "--json", "-x"}},
		{[]string{"--out=F", "-", "B"}, false, "F", []string{"-", "B"}},
		{nil, false, "", []string{}},
	}
	for _, tc := range cases {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		js := fs.Bool("json", false, "")
		out := fs.String("out", "", "")
		if err := Parse(fs, tc.args); err != nil {
			t.Fatalf("%q: %v", tc.args, err)
		}
		if *js != tc.json || *out != tc.out || !slices.Equal(fs.Args(), tc.wantPos) && len(tc.wantPos)+fs.NArg() > 0 {
			t.Errorf("%q: json %v out %q args %q; want %v %q %q", tc.args, *js, *out, fs.Args(), tc.json, tc.out, tc.wantPos)
		}
	}
}

func TestParseErrorsAfterPositional(t *testing.T) {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Bool("json", false, "")
	if err := Parse(fs, []string{"DIR", "--no-such-flag"}); err == nil {
		t.Fatal("an unknown flag after a positional was accepted")
	}
	fs = flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	if err := Parse(fs, []string{"DIR", "-h"}); err != flag.ErrHelp {
		t.Fatalf("-h after a positional: %v, want flag.ErrHelp", err)
	}
}

package parallel

import (
	"flag"
	"fmt"
	"io"
	"strings"
	"testing"
)

func TestSpecFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want SpecConfig
		err  string
	}{
		{args: nil, want: SpecConfig{}},
		{args: []string{"--speculative-config", `{"method":"mtp","num_speculative_tokens":1}`}, want: SpecConfig{"mtp", 1}},
		{args: []string{"--speculative-config.method", "mtp", "--speculative-config.num_speculative_tokens", "3"}, want: SpecConfig{"mtp", 3}},
		{args: []string{"--speculative-config.method=mtp", "--speculative-config.num_speculative_tokens=4"}, want: SpecConfig{"mtp", 4}},
		// The dotted fields override the JSON object's.
		{args: []string{"--speculative-config", `{"method":"mtp","num_speculative_tokens":1}`, "--speculative-config.num_speculative_tokens", "2"}, want: SpecConfig{"mtp", 2}},
		{args: []string{"--speculative-config.num_speculative_tokens", "5", "--speculative-config.method", "mtp"}, err: "outside [1, 4]"},
		{args: []string{"--speculative-config.num_speculative_tokens", "0", "--speculative-config.method", "mtp"}, err: "without num_speculative_tokens"},
		{args: []string{"--speculative-config.method", "eagle", "--speculative-config.num_speculative_tokens", "1"}, err: `method "eagle"`},
		{args: []string{"--speculative-config.method", "mtp"}, err: "without num_speculative_tokens"},
		{args: []string{"--speculative-config.num_speculative_tokens", "1"}, err: "without a method"},
		{args: []string{"--speculative-config", `{"method":"mtp","num_speculative_tokens":1,"model":"x"}`}, err: `unknown field "model"`},
		{args: []string{"--speculative-config", `{"method":"mtp"`}, err: "want e.g."},
		{args: []string{"--speculative-config", `{"method":"mtp","num_speculative_tokens":1} {}`}, err: "trailing data"},
		{args: []string{"--speculative-config.num_speculative_tokens", "one"}, err: "not an integer"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			fs := flag.NewFlagSet("t", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			f := AddSpecFlags(fs)
			err := fs.Parse(tc.args)
			var got SpecConfig
			if err == nil {
				got, err = f.Config()
			}
			checkSpecResult(t, got, err, tc.want, tc.err)
			// The same arguments among others, taken out for a foreign flag set.
			args := append(append([]string{"--model", "m"}, tc.args...), "--expect", "2")
			rest, got, err := SplitSpecArgs(args)
			checkSpecResult(t, got, err, tc.want, tc.err)
			if err == nil && fmt.Sprint(rest) != "[--model m --expect 2]" {
				t.Errorf("SplitSpecArgs left %q", rest)
			}
		})
	}
	if _, _, err := SplitSpecArgs([]string{"--speculative-config"}); err == nil || !strings.Contains(err.Error(), "needs an argument") {
		t.Errorf("a trailing flag without its value: %v", err)
	}
	if rest, c, err := SplitSpecArgs([]string{"--a", "--", "--speculative-config.method", "mtp"}); err != nil || c.Enabled() || len(rest) != 4 {
		t.Errorf("arguments after -- are not flags: %q %v %v", rest, c, err)
	}
}

func checkSpecResult(t *testing.T, got SpecConfig, err error, want SpecConfig, wantErr string) {
	t.Helper()
	switch {
	case wantErr == "" && err != nil:
		t.Errorf("error %v", err)
	case wantErr != "" && (err == nil || !strings.Contains(err.Error(), wantErr)):
		t.Errorf("error %v, want one containing %q", err, wantErr)
	case wantErr == "" && got != want:
		t.Errorf("got %+v want %+v", got, want)
	}
}

func TestSpecCheckEngine(t *testing.T) {
	e := loadFixtureEngine(t, "../testdata/glm4moe/tiny/model")
	if err := (SpecConfig{"mtp", 2}).CheckEngine(e); err != nil {
		t.Fatal(err)
	}
	mtp := e.W.MTP
	e.W.MTP = nil
	defer func() { e.W.MTP = mtp }()
	if err := (SpecConfig{"mtp", 1}).CheckEngine(e); err == nil || !strings.Contains(err.Error(), "MTP layer") {
		t.Errorf("an engine without the MTP layer: %v", err)
	}
	if err := (SpecConfig{}).CheckEngine(e); err != nil {
		t.Errorf("speculation off needs no MTP layer: %v", err)
	}
}

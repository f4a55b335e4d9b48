package serve

import (
	"strings"
	"testing"
)

func TestCheckMaxModelLen(t *testing.T) {
	cases := []struct {
		requested, positions int
		allow                bool
		wantErr, wantWarn    bool
	}{
		{0, 4096, false, false, false},
		{4096, 4096, false, false, false},
		{32768, 4096, false, true, false},
		{32768, 4096, true, false, true},
	}
	for _, tc := range cases {
		warn, err := CheckMaxModelLen(tc.requested, tc.positions, tc.allow)
		if (err != nil) != tc.wantErr || (warn != "") != tc.wantWarn {
			t.Errorf("%+v: warning %q, err %v", tc, warn, err)
		}
		if err != nil && !(strings.Contains(err.Error(), "max_position_embeddings 4096") && strings.Contains(err.Error(), "--allow-long-max-model-len")) {
			t.Errorf("error %q does not name the limit and the override", err)
		}
	}
}

package transportbench

import (
	"bytes"
	"context"
	"encoding/json"
	"reflect"
	"sort"
	"testing"
	"time"
)

func TestParseSizes(t *testing.T) {
	got, err := parseSizes("4K, 1M,10000,2G")
	if err != nil || !reflect.DeepEqual(got, []int64{4096, 1 << 20, 10000, 2 << 30}) {
		t.Fatalf("parseSizes = %v, %v", got, err)
	}
	for _, bad := range []string{"", "4Q", "-1", "K"} {
		if _, err := parseSizes(bad); err == nil {
			t.Errorf("parseSizes(%q) accepted", bad)
		}
	}
}

// TestLoopbackJSON runs the command end to end on loopback (small sizes)
// and checks the --json document's shape: one object per size and link,
// exactly the documented keys, measured (non-zero) numbers.
func TestLoopbackJSON(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var out, errb bytes.Buffer
	args := []string{"--sizes", "4K,64K", "--stream-bytes", "4M", "--rounds", "1", "--nccl", "off", "--json"}
	if err := Run(ctx, args, &out, &errb, Hooks{}); err != nil {
		t.Fatalf("%v\n%s", err, errb.String())
	}
	var doc struct {
		Results []map[string]any `json:"results"`
	}
	if err := json.Unmarshal(out.Bytes(), &doc); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if len(doc.Results) != 2 {
		t.Fatalf("%d results, want 2 (two sizes, one link)", len(doc.Results))
	}
	wantKeys := []string{"gbps", "link", "p50_us", "p99_us", "raw_gbps", "raw_p50_us", "size_bytes"}
	for i, r := range doc.Results {
		var keys []string
		for k := range r {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		if !reflect.DeepEqual(keys, wantKeys) {
			t.Fatalf("result %d has keys %v, want %v", i, keys, wantKeys)
		}
		if r["link"] != "tcp" || r["size_bytes"] != []float64{4096, 65536}[i] {
			t.Fatalf("result %d: %v", i, r)
		}
		for _, k := range []string{"gbps", "raw_gbps", "p50_us", "raw_p50_us"} {
			if v := r[k].(float64); v <= 0 {
				t.Fatalf("result %d: %s = %v", i, k, v)
			}
		}
	}
}

func TestTwoHostsNeedAKey(t *testing.T) {
	var out, errb bytes.Buffer
	err := Run(context.Background(), []string{"--peer", "127.0.0.1:1"}, &out, &errb, Hooks{})
	if err == nil {
		t.Fatal("--peer without a cluster key was accepted")
	}
}

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// completionText posts a greedy completion and returns its text.
func completionText(ctx context.Context, url string, maxTokens int) (string, error) {
	body := fmt.Sprintf(`{"model":"tiny","prompt":"Ranks on loopback","max_tokens":%d,"ignore_eos":true,"temperature":0}`, maxTokens)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url+"/v1/completions", strings.NewReader(body))
	if err != nil {
		return "", err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := (&http.Client{Transport: &http.Transport{DisableKeepAlives: true}}).Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("status %s", resp.Status)
	}
	var out struct {
		Choices []struct {
			Text string `json:"text"`
		} `json:"choices"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return "", err
	}
	if len(out.Choices) != 1 {
		return "", fmt.Errorf("%d choices", len(out.Choices))
	}
	return out.Choices[0].Text, nil
}

// TestLoopbackDaemonsOnRanks: `glmtopo node --tensor-parallel-size 2
// --enable-expert-parallel` runs each daemon's stage on two CPU ranks (the
// flag was once accepted and ignored); two such daemons serve the greedy
// completion of two plain daemons, and their logs say the layers ran on
// ranks.
func TestLoopbackDaemonsOnRanks(t *testing.T) {
	if testing.Short() {
		t.Skip("loopback cluster test skipped in -short")
	}
	dir := t.TempDir()
	model, key := filepath.Join(dir, "tiny"), filepath.Join(dir, "cluster.key")
	if _, errs, code := runCLI(t, "model", "synth", "--preset", "tiny", "--seed", "1", "--out", model); code != 0 {
		t.Fatalf("model synth: %s", errs)
	}
	if _, errs, code := runCLI(t, "node", "cluster-key", "--out", key); code != 0 {
		t.Fatalf("cluster-key: %s", errs)
	}
	serve := func(name string, extra ...string) string {
		sub := filepath.Join(dir, name)
		if err := os.MkdirAll(sub, 0o755); err != nil {
			t.Fatal(err)
		}
		const n = 2
		c := &loopCluster{daemonProcs: newDaemonProcs(t, sub, n), model: model, key: key,
			p2p: loopPorts(t, n), data: loopPorts(t, n), api: loopPorts(t, n), replanAfter: "30s", heartbeat: "200ms", extra: extra}
		defer func() {
			for i := range n {
				c.kill(i)
			}
		}()
		for i := range n {
			c.start(i)
		}
		st := c.wait(0, "a plan of 2 stages", 60*time.Second, stagesReady(n, 0))
		head := hostIndex(t, st.Stages[0].Host)
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		text, err := completionText(ctx, fmt.Sprintf("http://127.0.0.1:%d", c.api[head]), 12)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		for i := range n {
			data, _ := os.ReadFile(filepath.Join(sub, fmt.Sprintf("h%d.log", i)))
			if onRanks := strings.Contains(string(data), "decoder layers run on ranks"); onRanks != (len(extra) > 0) {
				t.Errorf("%s: daemon h%d's log says layers on ranks: %v", name, i, onRanks)
			}
		}
		return text
	}
	want := serve("plain")
	got := serve("ranks", "--tensor-parallel-size", "2", "--enable-expert-parallel")
	if got != want {
		t.Errorf("two daemons on 2 ranks each: %q; plain daemons: %q", got, want)
	}
	t.Logf("greedy text on both: %q", got)
}

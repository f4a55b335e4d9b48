package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/node"
)

// loopCluster is n daemons on 127.0.0.1, each its own process (the test
// binary re-executed), with its own ports.
type loopCluster struct {
	daemonProcs
	model, key             string
	p2p, data, api         []int
	replanAfter, heartbeat string
	extra                  []string // more flags for every daemon
}

func loopPorts(t *testing.T, n int) []int {
	t.Helper()
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports
}

func (c *loopCluster) stateDir(i int) string { return filepath.Join(c.dir, fmt.Sprint("h", i)) }

func (c *loopCluster) start(i int) {
	c.t.Helper()
	self, err := os.Executable()
	if err != nil {
		c.t.Fatal(err)
	}
	var peers []string
	for _, p := range c.p2p {
		peers = append(peers, fmt.Sprintf("127.0.0.1:%d", p))
	}
	cmd := exec.Command(self, "node", "--state-dir", c.stateDir(i), "--name", fmt.Sprint("h", i), "--cluster-key-file", c.key,
		"--listen", fmt.Sprintf("127.0.0.1:%d", c.p2p[i]), "--peers", strings.Join(peers, ","), "--mdns=false",
		"--model", c.model, "--expect", fmt.Sprint(len(c.p2p)), "--heartbeat-interval", c.heartbeat, "--replan-after", c.replanAfter,
		"--data-listen", fmt.Sprintf("127.0.0.1:%d", c.data[i]), "--host", "127.0.0.1", "--port", fmt.Sprint(c.api[i]),
		"--served-model-name", "tiny", "--max-num-seqs", "16")
	cmd.Args = append(cmd.Args, c.extra...)
	c.startDaemon(i, cmd)
}

// wait polls daemon i's status until ok returns "" or timeout passes.
func (c *loopCluster) wait(i int, what string, timeout time.Duration, ok func(node.Status) string) node.Status {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	why := "no status"
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		st, err := node.QueryStatus(ctx, c.stateDir(i))
		cancel()
		if err != nil {
			why = err.Error()
		} else if why = ok(st); why == "" {
			return st
		}
		time.Sleep(50 * time.Millisecond)
	}
	c.t.Fatalf("h%d: %s: not within %v: %s", i, what, timeout, why)
	return node.Status{}
}

// stagesReady: an active plan newer than after with n stages, all ready.
func stagesReady(n int, after uint64) func(node.Status) string {
	return func(st node.Status) string {
		if st.State != node.StateActive || st.PlanEpoch <= after || len(st.Stages) != n {
			return fmt.Sprintf("%s (%s), epoch %d, %d stages", st.State, st.Reason, st.PlanEpoch, len(st.Stages))
		}
		for _, s := range st.Stages {
			if s.State != node.StageReady {
				return fmt.Sprintf("stage %d on %s: %s %s", s.Stage, s.Host, s.State, s.Reason)
			}
		}
		return ""
	}
}

// complete posts a non-streaming completion and returns its usage.
func complete(ctx context.Context, url string, maxTokens int) (prompt, completion int, err error) {
	body := fmt.Sprintf(`{"model":"tiny","prompt":"Hello from loopback","max_tokens":%d,"ignore_eos":true,"temperature":0}`, maxTokens)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url+"/v1/completions", strings.NewReader(body))
	if err != nil {
		return 0, 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := (&http.Client{Transport: &http.Transport{DisableKeepAlives: true}}).Do(req)
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, 0, fmt.Errorf("status %s", resp.Status)
	}
	var out struct {
		Usage struct {
			Prompt     int `json:"prompt_tokens"`
			Completion int `json:"completion_tokens"`
		} `json:"usage"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return 0, 0, err
	}
	return out.Usage.Prompt, out.Usage.Completion, nil
}

// TestLoopbackStageStatsAndSurvivorReplan: three daemons on loopback run
// the tiny model's three stages on the CPU. After requests, the head's
// status shows every stage's steps (the same on all), tokens (each
// request's prompt and all but its last generated token) and link bytes.
// Then the last stage's daemon is SIGKILLed: after --replan-after 1s the
// two survivors, which can hold the model, serve under a new epoch of two
// stages with no daemon restarted; the lost daemon's return plans it in.
func TestLoopbackStageStatsAndSurvivorReplan(t *testing.T) {
	if testing.Short() {
		t.Skip("loopback cluster test skipped in -short")
	}
	began := time.Now()
	const n = 3
	dir := t.TempDir()
	c := &loopCluster{daemonProcs: newDaemonProcs(t, dir, n), model: filepath.Join(dir, "tiny"), key: filepath.Join(dir, "cluster.key"),
		p2p: loopPorts(t, n), data: loopPorts(t, n), api: loopPorts(t, n), replanAfter: "1s", heartbeat: "200ms"}
	if _, errs, code := runCLI(t, "model", "synth", "--preset", "tiny", "--seed", "1", "--out", c.model); code != 0 {
		t.Fatalf("model synth: %s", errs)
	}
	if _, errs, code := runCLI(t, "node", "cluster-key", "--out", c.key); code != 0 {
		t.Fatalf("cluster-key: %s", errs)
	}
	t.Cleanup(func() {
		for i := range n {
			c.kill(i)
		}
		if t.Failed() {
			for i := range n {
				data, _ := os.ReadFile(filepath.Join(dir, fmt.Sprintf("h%d.log", i)))
				lines := strings.Split(strings.TrimSpace(string(data)), "\n")
				t.Logf("--- h%d log (last lines)\n%s", i, strings.Join(lines[max(0, len(lines)-15):], "\n"))
			}
		}
	})
	for i := range n {
		c.start(i)
	}
	st := c.wait(0, "a plan of 3 stages", 60*time.Second, func(st node.Status) string {
		if len(st.Stages) != n {
			return fmt.Sprintf("%s (%s)", st.State, st.Reason)
		}
		return ""
	})
	head, last := hostIndex(t, st.Stages[0].Host), hostIndex(t, st.Stages[2].Host)
	st = c.wait(head, "3 stages ready", 60*time.Second, stagesReady(n, 0))
	epoch := st.PlanEpoch
	url := fmt.Sprintf("http://127.0.0.1:%d", c.api[head])
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()

	var mu sync.Mutex
	fed := int64(0)
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			p, g, err := complete(ctx, url, 4+i)
			if err != nil || g != 4+i {
				t.Errorf("request %d: %d tokens, %v", i, g, err)
			}
			mu.Lock()
			fed += int64(p + g - 1)
			mu.Unlock()
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	st = c.wait(head, "every stage's counters at the head", 10*time.Second, func(st node.Status) string {
		var steps int64
		for _, s := range st.Stages {
			m := s.StageMetrics
			if m == nil {
				return fmt.Sprintf("stage %d: no counters", s.Stage)
			}
			if s.Stage == 0 {
				steps = m.Steps
			}
			if m.Steps == 0 || m.Steps != steps || m.Tokens != fed || m.Link.TxBytes == 0 || m.Link.RxBytes == 0 ||
				m.StepMS.P50 <= 0 || m.StepMS.P99 < m.StepMS.P50 {
				return fmt.Sprintf("stage %d: %+v (want %d steps, %d tokens)", s.Stage, *m, steps, fed)
			}
		}
		return ""
	})
	for _, s := range st.Stages {
		t.Logf("stage %d on %s: %d steps, %d tokens, step p50 %.2f ms p99 %.2f ms, idle %.0f%%, sent %d B, received %d B",
			s.Stage, s.Host, s.Steps, s.Tokens, s.StepMS.P50, s.StepMS.P99, 100*s.IdleFrac, s.Link.TxBytes, s.Link.RxBytes)
	}

	c.kill(last)
	killed := time.Now()
	survivor := head
	if survivor == last {
		survivor = (last + 1) % n
	}
	st = c.wait(survivor, "a ready plan over the 2 survivors", 30*time.Second, stagesReady(2, epoch))
	replanned := time.Since(killed)
	newHead := hostIndex(t, st.Stages[0].Host)
	url = fmt.Sprintf("http://127.0.0.1:%d", c.api[newHead])
	for {
		_, g, err := complete(ctx, url, 6)
		if err == nil && g == 6 {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("the survivors' head h%d serves no request: %v", newHead, err)
		}
		time.Sleep(100 * time.Millisecond) // its API is starting with the new epoch
	}
	t.Logf("h%d SIGKILLed: epoch %d over 2 stages ready %v later, serving %v later", last, st.PlanEpoch,
		replanned.Round(time.Millisecond), time.Since(killed).Round(time.Millisecond))
	if replanned < time.Second {
		t.Errorf("the survivors replanned %v after the kill, within the 1 s grace", replanned)
	}

	c.start(last)
	st = c.wait(survivor, "3 stages again after the return", 60*time.Second, stagesReady(n, st.PlanEpoch))
	t.Logf("h%d back: epoch %d over 3 stages; whole test %v", last, st.PlanEpoch, time.Since(began).Round(time.Millisecond))
}

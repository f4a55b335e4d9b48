package parallel

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/transport"
	"github.com/glmtopo/glmtopo/transport/tcp"
)

// The multi-process tests re-execute the test binary as stage processes:
// TestMain runs a stage when stageProcEnv holds its job, and exits.
const stageProcEnv = "GLMTOPO_TEST_STAGE_PROC"

type stageProcJob struct {
	Dir        string
	First, End int
	Next       string // address of the next stage's (or the head's) acceptor
	Key        string // hex cluster key
	Seconds    int    // the process's lifetime at most
	// Source, when set, is opened instead of the fixture in Dir (OpenStage),
	// on the CUDA backend when CUDA is set.
	Source *ModelSource
	CUDA   bool
	// Link is the stage's --pipeline-link ("": auto, the head's choice).
	// With nccl the process gets its own NCCL_HOSTID, so that NCCL takes
	// it and the head as two ranks on the one GPU.
	Link PipelineLink
}

func TestMain(m *testing.M) {
	if job := os.Getenv(stageProcEnv); job != "" {
		if err := runStageProc(job); err != nil {
			fmt.Fprintln(os.Stderr, "stage process:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runStageProc is a stage process: it listens (printing its address),
// dials the next stage, accepts the previous one, and serves until its
// input closes or its lifetime ends.
func runStageProc(spec string) error {
	var job stageProcJob
	if err := json.Unmarshal([]byte(spec), &job); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(job.Seconds)*time.Second)
	defer cancel()
	key, err := hex.DecodeString(job.Key)
	if err != nil {
		return err
	}
	st, closeStage, err := openProcStage(ctx, job)
	if err != nil {
		return err
	}
	defer closeStage()
	l, err := ListenStage("127.0.0.1:0", tcp.Config{Name: fmt.Sprintf("stage-%d-%d", job.First, job.End), Key: key})
	if err != nil {
		return err
	}
	defer l.Close()
	fmt.Printf("ADDR %s\n", l.Addr())
	err = l.ServeLink(ctx, st, job.Next, job.Link)
	if b, jerr := json.Marshal(st.Stats()); jerr == nil {
		fmt.Printf("STATS %s\n", b)
	}
	return err
}

func openProcStage(ctx context.Context, job stageProcJob) (*Stage, func(), error) {
	if job.Source == nil {
		be, w := loadFixtureSelection(&procTB{}, job.Dir, stageSelection(job.First, job.End))
		st, err := NewStage(be, w)
		if err != nil {
			return nil, nil, err
		}
		return st, st.Close, nil
	}
	be, err := procBackend(job.CUDA)
	if err != nil {
		return nil, nil, err
	}
	st, release, err := OpenStage(ctx, *job.Source, be, job.First, job.End, nil)
	if err != nil {
		be.Close()
		return nil, nil, err
	}
	return st, func() { release(); be.Close() }, nil
}

// procTB lets a stage process use the test helpers that take a testing.TB:
// a failure ends the process.
type procTB struct{ testing.TB }

func (procTB) Helper()                      {}
func (procTB) Cleanup(func())               {}
func (procTB) Fatal(args ...any)            { fmt.Fprintln(os.Stderr, args...); os.Exit(1) }
func (procTB) Fatalf(f string, args ...any) { fmt.Fprintf(os.Stderr, f+"\n", args...); os.Exit(1) }
func (procTB) Errorf(f string, args ...any) { fmt.Fprintf(os.Stderr, f+"\n", args...) }
func (procTB) Logf(string, ...any)          {}

// procPipeline is a head engine in this process and stages in processes of
// their own, joined by TCP links on loopback.
type procPipeline struct {
	head  *Engine
	ring  *Ring
	procs []*stageProc // procs[i] runs stage i+1
}

type stageProc struct {
	cmd    *exec.Cmd
	killed atomic.Bool // by the test: its exit status is not a failure
	stats  atomic.Pointer[StageStats]
	done   chan struct{} // closed when the process has exited
}

// waitStats waits (up to d) for the process to exit and returns the
// counters it printed, or nil.
func (p *stageProc) waitStats(d time.Duration) *StageStats {
	select {
	case <-p.done:
	case <-time.After(d):
	}
	return p.stats.Load()
}

// kill ends the stage process as a lost node would end.
func (p *stageProc) kill() error {
	p.killed.Store(true)
	return p.cmd.Process.Kill()
}

func startProcPipeline(t *testing.T, dir string, bounds []int, opt EngineOptions, ropt RingOptions) *procPipeline {
	t.Helper()
	if testing.Short() {
		t.Skip("multi-process pipeline in -short mode")
	}
	key := make([]byte, 32)
	rand.Read(key)
	acc, err := ListenHead("127.0.0.1:0", tcp.Config{Name: "head", Key: key})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { acc.Close() })
	S := len(bounds) - 1
	p := &procPipeline{procs: make([]*stageProc, S-1)}
	next := acc.Addr().String()
	for i := S - 1; i >= 1; i-- { // last first: each stage dials the one after it
		var addr string
		p.procs[i-1], addr = startStageProc(t, stageProcJob{Dir: dir, First: bounds[i], End: bounds[i+1], Next: next,
			Key: hex.EncodeToString(key), Seconds: 120})
		next = addr
	}
	p.head = loadHeadEngine(t, dir, bounds[1], opt)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if p.ring, err = ConnectRingTCP(ctx, p.head, acc, next, ropt); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.ring.Close() })
	return p
}

// startStageProc starts one stage process and waits (30 s at most) for its
// address; the process is killed when the test ends if it has not exited.
func startStageProc(t *testing.T, job stageProcJob) (*stageProc, string) {
	t.Helper()
	spec, err := json.Marshal(job)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), stageProcEnv+"="+string(spec))
	if job.Link == LinkNCCL {
		cmd.Env = append(cmd.Env, fmt.Sprintf("NCCL_HOSTID=%s-stage-%d", os.Getenv("NCCL_HOSTID"), job.First))
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sp := &stageProc{cmd: cmd, done: make(chan struct{})}
	exited := make(chan error, 1)
	addrs := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), "ADDR "); ok {
				addrs <- a
			}
			if b, ok := strings.CutPrefix(sc.Text(), "STATS "); ok {
				var st StageStats
				if json.Unmarshal([]byte(b), &st) == nil {
					sp.stats.Store(&st)
				}
			}
		}
		err := cmd.Wait()
		close(sp.done)
		exited <- err
	}()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cmd.Process.Kill()
			select {
			case <-exited:
			case <-time.After(10 * time.Second):
				t.Errorf("stage process %d did not exit", cmd.Process.Pid)
			}
		})
	}
	t.Cleanup(func() {
		// A stage whose input closed exits by itself; give it a moment, then kill it.
		select {
		case err := <-exited:
			if err != nil && !t.Failed() && !sp.killed.Load() {
				t.Errorf("stage process [%d,%d): %v: %s", job.First, job.End, err, stderr.String())
			}
			once.Do(func() {})
		case <-time.After(5 * time.Second):
			stop()
		}
	})
	select {
	case a := <-addrs:
		return sp, a
	case err := <-exited:
		t.Fatalf("stage process [%d,%d) exited: %v: %s", job.First, job.End, err, stderr.String())
	case <-time.After(30 * time.Second):
		stop()
		t.Fatalf("stage process [%d,%d) printed no address in 30 s: %s", job.First, job.End, stderr.String())
	}
	return nil, ""
}

// TestPipelineProcessesBitIdentical: 2 and 3 stages as separate processes
// over TCP on loopback give the single-process engine's logits bit for bit
// and its scheduler's tokens, on both fixtures.
func TestPipelineProcessesBitIdentical(t *testing.T) {
	for _, fx := range fixtures {
		dir := fixtureDir(fx)
		wantLogits := stepScript(t, wholeEngine(t, dir, testEngineOpt))
		items, wantWork := referenceWork(t, dir, schedOpt)
		for _, S := range stageCounts {
			bounds := splitLayers(numLayers(t, dir), S)
			t.Run(fmt.Sprintf("%s/%dstages", fx, S), func(t *testing.T) {
				p := startProcPipeline(t, dir, bounds, testEngineOpt, RingOptions{StepTimeout: 10 * time.Second})
				compareLogits(t, stepScript(t, p.head), wantLogits)
				// The scheduler, one micro-batch at a time and S in flight.
				for _, m := range []int{1, S} {
					q := startProcPipeline(t, dir, bounds, smallKV, RingOptions{StepTimeout: 10 * time.Second, MicroBatches: m})
					s := NewScheduler(q.head, schedOpt)
					compareWork(t, runWorkload(t, s, items), wantWork)
					s.Close()
				}
			})
		}
	}
}

// TestPipelineStageKilledEndsRequests: SIGKILL of the middle stage process
// mid-generation, with three micro-batches in the ring, ends every request
// in flight with an error within 5 s.
func TestPipelineStageKilledEndsRequests(t *testing.T) {
	dir := fixtureDir("tiny")
	p := startProcPipeline(t, dir, splitLayers(numLayers(t, dir), 3), testEngineOpt, RingOptions{StepTimeout: 3 * time.Second, MicroBatches: 3})
	// Eight requests of 4 + 100 tokens (7 blocks each) all fit the 64-block
	// cache at once: three micro-batches of 3, 3 and 2 sequences.
	s := NewScheduler(p.head, SchedulerOptions{MaxNumSeqs: 8, PrefillTokens: 24})
	defer s.Close()
	const n = 8
	started := make(chan struct{}, n)
	type outcome struct {
		err error
		at  time.Time
	}
	results := make(chan outcome, n)
	for i := range n {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			n := 0
			_, err := s.Generate(ctx, Request{PromptIDs: []int{1 + i, 2, 3, 4 + i}, MaxNewTokens: 100, IgnoreEOS: true}, func(int) error {
				if n++; n == 3 {
					started <- struct{}{}
				}
				return nil
			})
			results <- outcome{err, time.Now()}
		}()
	}
	for range n { // every request is decoding
		<-started
	}
	if p.ring.pipe.peak != 3 {
		t.Errorf("%d micro-batches were in flight, want 3", p.ring.pipe.peak)
	}
	killed := time.Now()
	if err := p.procs[0].kill(); err != nil {
		t.Fatal(err)
	}
	for range n {
		select {
		case r := <-results:
			if !errors.Is(r.err, ErrPipelineDown) {
				t.Errorf("a request ended with %v after its stage died, want ErrPipelineDown", r.err)
			}
			if d := r.at.Sub(killed); d > 5*time.Second {
				t.Errorf("a request ended %v after the kill", d)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a request was still running 10 s after its stage died")
		}
	}
	if err := p.ring.Err(); err == nil || !errors.As(err, new(*transport.Error)) {
		t.Errorf("ring error %v, want the link's error", err)
	}
}

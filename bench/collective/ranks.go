package collectivebench

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/transport/nccl"
)

// childEnv tells a re-executed process which rank it is:
// "rank/nranks/device/unique id in hex".
const childEnv = "GLMTOPO_BENCH_COLLECTIVE_RANK"

// childSpec is one rank's part of the run.
type childSpec struct {
	rank, nranks, device int
	id                   nccl.UniqueID
}

func (c childSpec) String() string {
	return fmt.Sprintf("%d/%d/%d/%s", c.rank, c.nranks, c.device, hex.EncodeToString(c.id[:]))
}

func parseChildSpec(s string) (childSpec, error) {
	var c childSpec
	f := strings.Split(s, "/")
	if len(f) != 4 {
		return c, fmt.Errorf("%s=%q: want rank/nranks/device/id", childEnv, s)
	}
	var err error
	for i, dst := range []*int{&c.rank, &c.nranks, &c.device} {
		if *dst, err = strconv.Atoi(f[i]); err != nil {
			return c, fmt.Errorf("%s: field %d: %w", childEnv, i, err)
		}
	}
	if c.nranks < 1 || c.rank < 0 || c.rank >= c.nranks || c.device < 0 {
		return c, fmt.Errorf("%s=%q: rank %d of %d on device %d", childEnv, s, c.rank, c.nranks, c.device)
	}
	b, err := hex.DecodeString(f[3])
	if err != nil {
		return c, fmt.Errorf("%s: unique id: %w", childEnv, err)
	}
	c.id, err = nccl.ParseUniqueID(b)
	return c, err
}

// planDevices assigns rank i a GPU: o.Devices when given (each must open),
// else GPU i when there are as many GPUs as ranks, else the GPUs there are
// in turn. shared reports two ranks on one GPU. open opens and closes a
// device ordinal.
func planDevices(o Options, open func(int) error) (devs []int, shared bool, err error) {
	if o.Devices != nil {
		seen := map[int]bool{}
		for _, d := range o.Devices {
			if !seen[d] {
				if err := open(d); err != nil {
					return nil, false, fmt.Errorf("%w: GPU %d: %v", ErrNoGPU, d, err)
				}
			}
			shared = shared || seen[d]
			seen[d] = true
		}
		return o.Devices, shared, nil
	}
	count := 0
	for ; count < o.Ranks; count++ {
		if err := open(count); err != nil {
			if count == 0 {
				return nil, false, fmt.Errorf("%w: %v", ErrNoGPU, err)
			}
			break
		}
	}
	devs = make([]int, o.Ranks)
	for i := range devs {
		devs[i] = i % count
	}
	return devs, count < o.Ranks, nil
}

func openClose(ordinal int) error {
	d, err := cuda.OpenDevice(ordinal)
	if err != nil {
		return err
	}
	return d.Close()
}

// mpsPipe is where the MPS daemon's control pipe would be.
func mpsPipe() string {
	dir := os.Getenv("CUDA_MPS_PIPE_DIRECTORY")
	if dir == "" {
		dir = "/tmp/nvidia-mps"
	}
	return filepath.Join(dir, "control")
}

// mpsReachable reports whether an MPS control daemon's pipe exists.
func mpsReachable() bool {
	fi, err := os.Stat(mpsPipe())
	return err == nil && fi.Mode()&(os.ModeSocket|os.ModeNamedPipe) != 0
}

// runRanks starts one process per rank, waits for them all and merges
// their reports. This process creates the unique id (NCCL's bootstrap root
// runs here while the ranks rendezvous) and takes part in nothing else.
func runRanks(ctx context.Context, o Options, args []string, stderr io.Writer) (*Report, error) {
	ver, err := nccl.Version()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoGPU, err)
	}
	devs, shared, err := planDevices(o, openClose)
	if err != nil {
		return nil, err
	}
	mps := false
	if shared {
		if mps = mpsReachable(); !mps {
			fmt.Fprintf(stderr, "warning: ranks share a GPU and no MPS daemon answers at %s: their contexts time-slice, so times will be milliseconds, not microseconds (start it with nvidia-cuda-mps-control -d)\n", mpsPipe())
		}
	}
	id, err := nccl.NewUniqueID()
	if err != nil {
		return nil, err
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	outs := make([]bytes.Buffer, o.Ranks)
	var (
		wg    sync.WaitGroup
		once  sync.Once
		first error // the first rank to fail: the others are then killed
	)
	for rank := range o.Ranks {
		cmd := exec.CommandContext(ctx, exe, append(append([]string(nil), o.Command...), args...)...)
		cmd.Env = append(os.Environ(), childEnv+"="+childSpec{rank: rank, nranks: o.Ranks, device: devs[rank], id: id}.String())
		if shared {
			// Distinct host ids let NCCL accept ranks of one GPU.
			cmd.Env = append(cmd.Env, fmt.Sprintf("NCCL_HOSTID=%s-glmtopo-bench-%d-rank%d", hostID(), os.Getpid(), rank))
		}
		cmd.Stdout, cmd.Stderr = &outs[rank], stderr
		if err := cmd.Start(); err != nil {
			cancel()
			wg.Wait() // the ranks already started are killed and reaped
			return nil, fmt.Errorf("rank %d: %w", rank, err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := cmd.Wait(); err != nil {
				once.Do(func() { first = fmt.Errorf("rank %d (GPU %d): %w", rank, devs[rank], errors.Join(err, ctx.Err())) })
				cancel() // the others would wait for this rank until the timeout
			}
		}()
	}
	wg.Wait()
	if first != nil {
		return nil, first
	}
	reps := make([]*Report, o.Ranks)
	for rank := range o.Ranks {
		doc, other := lastJSONLine(outs[rank].Bytes())
		stderr.Write(other)
		reps[rank] = new(Report)
		if err := json.Unmarshal(doc, reps[rank]); err != nil {
			return nil, fmt.Errorf("rank %d's report: %w", rank, err)
		}
	}
	rep, err := merge(reps)
	if err != nil {
		return nil, err
	}
	rep.Devices, rep.SharedGPU, rep.MPS, rep.NCCLVersion = devs, shared, mps, ver
	return rep, nil
}

// hostID is the base of the per-rank NCCL_HOSTIDs: the user's, or the
// host name.
func hostID() string {
	if v := os.Getenv("NCCL_HOSTID"); v != "" {
		return v
	}
	h, _ := os.Hostname()
	return h
}

// lastJSONLine splits a rank's stdout into its report (the last line that
// starts with '{') and everything else, which NCCL writes there when the
// user sets NCCL_DEBUG without NCCL_DEBUG_FILE.
func lastJSONLine(out []byte) (doc, other []byte) {
	lines := bytes.SplitAfter(out, []byte("\n"))
	last := -1
	for i, l := range lines {
		if bytes.HasPrefix(l, []byte("{")) {
			last = i
		}
	}
	for i, l := range lines {
		if i == last {
			doc = l
		} else {
			other = append(other, l...)
		}
	}
	return doc, other
}

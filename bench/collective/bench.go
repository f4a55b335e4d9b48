// Package collectivebench is `glmtopo bench collective`: NCCL's all-reduce,
// all-gather, reduce-scatter and all-to-all-v at the sizes GLM-4.5's
// tensor- and expert-parallel stages move (decode: batch 1 … 64 rows of the
// 5120-wide hidden state in bf16, 10 KiB … 640 KiB; prefill: a 2048-token
// chunk, 20 MiB), with per-size p50/p99 times and the algorithm and bus
// bandwidths defined as nccl-tests defines them, so the numbers compare
// with NCCL's published rates.
//
// Every rank is a process of its own (this binary, re-executed): one per
// GPU when there are as many GPUs as ranks, otherwise ranks share GPUs,
// each with its own NCCL_HOSTID so that NCCL accepts two ranks on one
// device (such ranks talk over NET/Socket, and need the CUDA MPS daemon not
// to time-slice). p50/p99 are per call, host-measured: enqueue to the
// stream finishing (what a step waits for); "queued" is nccl-tests' own
// timing, the mean of calls queued back to back and waited for once.
package collectivebench

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
)

// The collectives measured, by the names flags and results use.
const (
	OpAllReduce     = "all-reduce"
	OpAllGather     = "all-gather"
	OpReduceScatter = "reduce-scatter"
	OpAllToAllV     = "all-to-all-v"
)

// AllOps is every collective, in the order they are measured.
var AllOps = []string{OpAllReduce, OpAllGather, OpReduceScatter, OpAllToAllV}

// BusFactor is nccl-tests' bus bandwidth factor for op on n ranks
// (busbw = algbw × factor; see nccl-tests' doc/PERFORMANCE.md): an
// all-reduce moves 2(n-1)/n of its buffer through each rank's link, the
// others (n-1)/n. One rank moves nothing over a bus: 0.
func BusFactor(op string, n int) (float64, error) {
	if n < 1 {
		return 0, fmt.Errorf("%d ranks", n)
	}
	f := float64(n-1) / float64(n)
	switch op {
	case OpAllReduce:
		return 2 * f, nil
	case OpAllGather, OpReduceScatter, OpAllToAllV:
		return f, nil
	}
	return 0, fmt.Errorf("unknown collective %q", op)
}

// Shape is how many elements a rank passes NCCL for a tensor of elems
// elements, and the size nccl-tests reports for it (its "size": the
// all-reduce's buffer, the all-gather's whole output, the reduce-scatter's
// whole input, the all-to-all's whole send buffer). The split collectives
// round elems down to a multiple of n.
func Shape(op string, elems int64, n int) (count, sizeElems int64) {
	if op == OpAllReduce {
		return elems, elems
	}
	per := elems / int64(n)
	return per, per * int64(n)
}

// Result is one collective at one size, as --json prints it.
type Result struct {
	Op        string  `json:"op"`
	Phase     string  `json:"phase"` // decode or prefill
	Batch     int     `json:"batch"` // rows of the hidden state
	SizeBytes int64   `json:"size_bytes"`
	Count     int64   `json:"count"` // elements each rank passes NCCL
	P50us     float64 `json:"p50_us"`
	P99us     float64 `json:"p99_us"`
	AlgBW     float64 `json:"algbw_gbps"` // size / p50 time, GB/s (1e9)
	BusBW     float64 `json:"busbw_gbps"` // algbw × BusFactor
	// Queued is nccl-tests' time: the mean per call of calls queued back to
	// back and waited for once (launch costs overlap the transfers).
	QueuedUs    float64 `json:"queued_us"`
	QueuedBusBW float64 `json:"queued_busbw_gbps"`
}

// Report is the --json document.
type Report struct {
	Ranks       int      `json:"ranks"`
	Devices     []int    `json:"devices"` // rank i's GPU
	DType       string   `json:"dtype"`
	Hidden      int      `json:"hidden"`
	NCCLVersion int      `json:"nccl_version"`
	SharedGPU   bool     `json:"shared_gpu"` // some ranks share a GPU (NET/Socket between them)
	MPS         bool     `json:"mps"`        // the MPS daemon answered (only looked for when shared)
	Results     []Result `json:"results"`
}

// bandwidth fills r's bandwidths from its p50 time.
func (r *Result) bandwidth(n int) error {
	f, err := BusFactor(r.Op, n)
	if err != nil {
		return err
	}
	gbps := func(us float64) float64 {
		if us <= 0 {
			return 0
		}
		return float64(r.SizeBytes) / (us * 1e-6) / 1e9
	}
	r.AlgBW = gbps(r.P50us)
	r.BusBW = r.AlgBW * f
	r.QueuedBusBW = gbps(r.QueuedUs) * f
	return nil
}

// merge folds the ranks' own reports into one: a collective ends when its
// slowest rank's does, so each size keeps the largest p50 and p99 of any
// rank, and the bandwidths follow from that p50.
func merge(ranks []*Report) (*Report, error) {
	if len(ranks) == 0 {
		return nil, fmt.Errorf("no rank reported")
	}
	out := *ranks[0]
	out.Results = slices.Clone(ranks[0].Results)
	for i, r := range ranks[1:] {
		if len(r.Results) != len(out.Results) {
			return nil, fmt.Errorf("rank %d reported %d results, rank 0 %d", i+1, len(r.Results), len(out.Results))
		}
		for j, x := range r.Results {
			m := &out.Results[j]
			if x.Op != m.Op || x.SizeBytes != m.SizeBytes {
				return nil, fmt.Errorf("rank %d result %d is %s of %d bytes, rank 0's %s of %d", i+1, j, x.Op, x.SizeBytes, m.Op, m.SizeBytes)
			}
			m.P50us, m.P99us, m.QueuedUs = max(m.P50us, x.P50us), max(m.P99us, x.P99us), max(m.QueuedUs, x.QueuedUs)
		}
	}
	for j := range out.Results {
		if err := out.Results[j].bandwidth(out.Ranks); err != nil {
			return nil, err
		}
	}
	return &out, nil
}

func writeJSON(w io.Writer, rep *Report) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(rep)
}

func writeTable(w io.Writer, rep *Report) error {
	where := fmt.Sprintf("GPUs %v", rep.Devices)
	if rep.SharedGPU {
		where += fmt.Sprintf(" (shared: NET/Socket between ranks of one GPU; MPS daemon: %v)", rep.MPS)
	}
	v := rep.NCCLVersion
	fmt.Fprintf(w, "%d ranks on %s, NCCL %d.%d.%d, %s, hidden %d; busbw as nccl-tests: all-reduce ×2(n-1)/n, the others ×(n-1)/n\n",
		rep.Ranks, where, v/10000, v/100%100, v%100, rep.DType, rep.Hidden)
	fmt.Fprintf(w, "%-15s %-8s %6s %10s %10s %10s %11s %11s %10s %11s\n", "collective", "phase", "batch", "size",
		"p50 µs", "p99 µs", "algbw GB/s", "busbw GB/s", "queued µs", "queued bus")
	for _, r := range rep.Results {
		fmt.Fprintf(w, "%-15s %-8s %6d %10s %10.1f %10.1f %11.2f %11.2f %10.1f %11.2f\n", r.Op, r.Phase, r.Batch, human(r.SizeBytes),
			r.P50us, r.P99us, r.AlgBW, r.BusBW, r.QueuedUs, r.QueuedBusBW)
	}
	return nil
}

func human(n int64) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d B", n)
}

// parseOps checks a comma-separated list of collective names.
func parseOps(s string) ([]string, error) {
	var ops []string
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if !slices.Contains(AllOps, f) {
			return nil, fmt.Errorf("--ops: unknown collective %q (want some of %s)", f, strings.Join(AllOps, ","))
		}
		ops = append(ops, f)
	}
	return ops, nil
}

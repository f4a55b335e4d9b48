package step

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"slices"

	collectivebench "github.com/glmtopo/glmtopo/bench/collective"
	"github.com/glmtopo/glmtopo/topology"
)

// allReduceRate is how long an all-reduce of a buffer takes on the
// stage's GPUs.
type allReduceRate interface {
	Seconds(bytes int64) float64
	// Source says where the rate comes from, for the report.
	Source() string
}

// measuredAllReduce interpolates the p50 times `glmtopo bench collective
// --json` measured: linearly in size between two measured sizes, the
// smallest's time below them (latency-bound), and the largest's algorithm
// bandwidth above them.
type measuredAllReduce struct {
	file  string
	ranks int
	sizes []int64   // ascending
	secs  []float64 // p50
}

// loadAllReduce reads a bench collective --json report measured on ranks
// ranks.
func loadAllReduce(path string, ranks int) (*measuredAllReduce, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--collective-json: %w", err)
	}
	var rep collectivebench.Report
	if err := json.Unmarshal(data, &rep); err != nil {
		return nil, fmt.Errorf("--collective-json %s: not a `glmtopo bench collective --json` report: %w", path, err)
	}
	return newMeasuredAllReduce(path, &rep, ranks)
}

func newMeasuredAllReduce(path string, rep *collectivebench.Report, ranks int) (*measuredAllReduce, error) {
	if rep.Ranks != ranks {
		return nil, fmt.Errorf("--collective-json %s measured %d ranks; --tensor-parallel-size is %d (run glmtopo bench collective --ranks %d --json)",
			path, rep.Ranks, ranks, ranks)
	}
	m := &measuredAllReduce{file: path, ranks: ranks}
	byte2sec := map[int64]float64{}
	for _, r := range rep.Results {
		if r.Op != collectivebench.OpAllReduce || r.SizeBytes <= 0 || r.P50us <= 0 {
			continue
		}
		if s, ok := byte2sec[r.SizeBytes]; !ok || r.P50us*1e-6 < s {
			byte2sec[r.SizeBytes] = r.P50us * 1e-6
		}
	}
	if len(byte2sec) == 0 {
		return nil, fmt.Errorf("--collective-json %s has no all-reduce timings (run glmtopo bench collective --ops all-reduce --json)", path)
	}
	for b := range byte2sec {
		m.sizes = append(m.sizes, b)
	}
	slices.Sort(m.sizes)
	for _, b := range m.sizes {
		m.secs = append(m.secs, byte2sec[b])
	}
	return m, nil
}

func (m *measuredAllReduce) Seconds(bytes int64) float64 {
	i, found := slices.BinarySearch(m.sizes, bytes)
	switch {
	case found:
		return m.secs[i]
	case i == 0:
		return m.secs[0]
	case i == len(m.sizes):
		last := len(m.sizes) - 1
		return m.secs[last] * float64(bytes) / float64(m.sizes[last])
	}
	s0, s1 := float64(m.sizes[i-1]), float64(m.sizes[i])
	f := (float64(bytes) - s0) / (s1 - s0)
	return m.secs[i-1] + f*(m.secs[i]-m.secs[i-1])
}

func (m *measuredAllReduce) Source() string {
	return fmt.Sprintf("measured (%s, %d ranks, %d all-reduce sizes)", m.file, m.ranks, len(m.sizes))
}

// catalogAllReduce is the planner's model of a host's all-reduce
// (topology's cost model): a ring's 2(n−1)/n of the buffer over the GPU's
// peer link at the catalog's efficiency, plus (1+log₂ n) link latencies.
type catalogAllReduce struct {
	gpu      string
	link     string
	n        int
	bw, lat  float64 // bytes/s, seconds
	linkGBps float64
	eff      float64
}

func newCatalogAllReduce(spec topology.GPUSpec, n int) *catalogAllReduce {
	e := spec.Efficiency
	c := &catalogAllReduce{gpu: spec.Name, n: n, link: "NVLink", linkGBps: spec.NVLinkGBps, eff: e.NVLink, lat: e.NVLinkLatencyUS * 1e-6}
	if spec.NVLinkGBps <= 0 {
		c.link, c.linkGBps, c.eff, c.lat = "PCIe", spec.PCIeGBps, e.PCIe, e.PCIeLatencyUS*1e-6
	}
	c.bw = c.linkGBps * 1e9 * c.eff
	return c
}

func (c *catalogAllReduce) Seconds(bytes int64) float64 {
	if c.n <= 1 {
		return 0
	}
	n := float64(c.n)
	return 2*(n-1)/n*float64(bytes)/c.bw + (1+math.Log2(n))*c.lat
}

func (c *catalogAllReduce) Source() string {
	return fmt.Sprintf("catalog (%s %s %.0f GB/s × %.2f, %.0f µs per step; measure with glmtopo bench collective --json)",
		c.gpu, c.link, c.linkGBps, c.eff, c.lat*1e6)
}

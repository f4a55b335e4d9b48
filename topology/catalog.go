package topology

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"

	"go.yaml.in/yaml/v3"
)

// GPUSpec is a GPU's datasheet figures. Bandwidths are one direction per GPU.
type GPUSpec struct {
	Name        string   `json:"name"`
	Aliases     []string `json:"aliases,omitempty"`
	MemoryBytes int64    `json:"memory_bytes"` // as the driver reports it
	HBMGBps     float64  `json:"hbm_gbps"`
	BF16TFLOPS  float64  `json:"bf16_tflops"` // dense
	FP8TFLOPS   float64  `json:"fp8_tflops"`  // dense; 0 without FP8 tensor cores
	// NVLinkGBps is the per-GPU peer fabric bandwidth in one direction
	// (NVLink/NVSwitch, or Infinity Fabric for MI300X); 0 without one.
	NVLinkGBps          float64    `json:"nvlink_gbps"`
	PCIeGBps            float64    `json:"pcie_gbps"` // x16 link, one direction
	DefaultInterconnect string     `json:"default_interconnect"`
	Efficiency          Efficiency `json:"efficiency"`
}

// FP8 reports whether the GPU has FP8 tensor cores.
func (g GPUSpec) FP8() bool { return g.FP8TFLOPS > 0 }

// Efficiency is the fraction of datasheet figures real kernels reach, and
// fixed costs. `glmtopo bench` measures these and writes a calibration file.
type Efficiency struct {
	HBM              float64 `yaml:"hbm" json:"hbm"`                               // achievable / peak HBM bandwidth
	GEMM             float64 `yaml:"gemm" json:"gemm"`                             // achievable / peak dense FLOP/s
	KernelOverheadUS float64 `yaml:"kernel_overhead_us" json:"kernel_overhead_us"` // per kernel, CUDA graphs on
	NVLink           float64 `yaml:"nvlink" json:"nvlink"`                         // achievable / peak NVLink bandwidth
	NVLinkLatencyUS  float64 `yaml:"nvlink_latency_us" json:"nvlink_latency_us"`   // one collective step over NVLink
	PCIe             float64 `yaml:"pcie" json:"pcie"`                             // achievable / peak PCIe bandwidth
	PCIeLatencyUS    float64 `yaml:"pcie_latency_us" json:"pcie_latency_us"`       // one collective step over PCIe
	NIC              float64 `yaml:"nic" json:"nic"`                               // achievable / line rate
	NICLatencyUS     float64 `yaml:"nic_latency_us" json:"nic_latency_us"`         // one pipeline hop, RDMA
	TCPLatencyUS     float64 `yaml:"tcp_latency_us" json:"tcp_latency_us"`         // one pipeline hop, TCP
}

const mib = 1 << 20

// Typical defaults; AMD's software stack reaches lower fractions today.
// PCIe peer traffic goes through switches and the CPU root complex: lower
// efficiency and longer steps than NVLink.
var (
	nvidiaEff = Efficiency{HBM: 0.75, GEMM: 0.70, KernelOverheadUS: 2, NVLink: 0.75, NVLinkLatencyUS: 3,
		PCIe: 0.6, PCIeLatencyUS: 10, NIC: 0.85, NICLatencyUS: 12, TCPLatencyUS: 45}
	amdEff = Efficiency{HBM: 0.65, GEMM: 0.50, KernelOverheadUS: 4, NVLink: 0.65, NVLinkLatencyUS: 5,
		PCIe: 0.6, PCIeLatencyUS: 10, NIC: 0.85, NICLatencyUS: 12, TCPLatencyUS: 45}
)

// catalog holds the datasheet figures (NVIDIA and AMD product briefs).
// Memory is what nvidia-smi / rocm-smi report as total.
var catalog = []GPUSpec{
	{Name: "H100-SXM-80G", Aliases: []string{"H100", "H100-80G", "H100-SXM", "H100-SXM5", "H100-80GB"},
		MemoryBytes: 81559 * mib, HBMGBps: 3350, BF16TFLOPS: 989, FP8TFLOPS: 1979,
		NVLinkGBps: 450, PCIeGBps: 64, DefaultInterconnect: InterconnectNVLink, Efficiency: nvidiaEff},
	{Name: "H100-PCIe-80G", Aliases: []string{"H100-PCIe", "H100-PCIE-80GB"},
		MemoryBytes: 81559 * mib, HBMGBps: 2000, BF16TFLOPS: 756, FP8TFLOPS: 1513,
		NVLinkGBps: 300, PCIeGBps: 64, DefaultInterconnect: InterconnectPCIe, Efficiency: nvidiaEff},
	{Name: "H200", Aliases: []string{"H200-141G", "H200-SXM", "H200-141GB"},
		// cuMemGetInfo's total (nvidia-smi says 143771 MiB): the engine's
		// --gpu-memory-utilization budget is a fraction of it.
		MemoryBytes: 150109880320, HBMGBps: 4800, BF16TFLOPS: 989, FP8TFLOPS: 1979,
		NVLinkGBps: 450, PCIeGBps: 64, DefaultInterconnect: InterconnectNVLink, Efficiency: nvidiaEff},
	{Name: "A100-40G", Aliases: []string{"A100-SXM-40G", "A100-40GB"},
		MemoryBytes: 40960 * mib, HBMGBps: 1555, BF16TFLOPS: 312, FP8TFLOPS: 0,
		NVLinkGBps: 300, PCIeGBps: 32, DefaultInterconnect: InterconnectNVLink, Efficiency: nvidiaEff},
	{Name: "A100-80G", Aliases: []string{"A100", "A100-SXM-80G", "A100-80GB"},
		MemoryBytes: 81920 * mib, HBMGBps: 2039, BF16TFLOPS: 312, FP8TFLOPS: 0,
		NVLinkGBps: 300, PCIeGBps: 32, DefaultInterconnect: InterconnectNVLink, Efficiency: nvidiaEff},
	{Name: "L40S", Aliases: []string{"L40S-48G"},
		MemoryBytes: 46068 * mib, HBMGBps: 864, BF16TFLOPS: 362, FP8TFLOPS: 733,
		NVLinkGBps: 0, PCIeGBps: 32, DefaultInterconnect: InterconnectPCIe, Efficiency: nvidiaEff},
	{Name: "B200", Aliases: []string{"B200-180G", "B200-SXM"},
		MemoryBytes: 183359 * mib, HBMGBps: 8000, BF16TFLOPS: 2250, FP8TFLOPS: 4500,
		NVLinkGBps: 900, PCIeGBps: 64, DefaultInterconnect: InterconnectNVLink, Efficiency: nvidiaEff},
	{Name: "MI300X", Aliases: []string{"MI300X-192G"},
		MemoryBytes: 196592 * mib, HBMGBps: 5300, BF16TFLOPS: 1307, FP8TFLOPS: 2615,
		NVLinkGBps: 448, PCIeGBps: 64, DefaultInterconnect: InterconnectNVLink, Efficiency: amdEff},
}

func normGPUName(s string) string {
	s = strings.ToUpper(strings.TrimSpace(s))
	return strings.NewReplacer("_", "-", " ", "-").Replace(s)
}

// GPUModels lists the catalog's model names.
func GPUModels() []string {
	var names []string
	for _, g := range catalog {
		names = append(names, g.Name)
	}
	return names
}

// LookupGPU finds a GPU by name or alias, case-insensitively.
func LookupGPU(name string) (GPUSpec, error) {
	n := normGPUName(name)
	for _, g := range catalog {
		if normGPUName(g.Name) == n {
			return g, nil
		}
		for _, a := range g.Aliases {
			if normGPUName(a) == n {
				return g, nil
			}
		}
	}
	var known []string
	for _, g := range catalog {
		known = append(known, g.Name+" ("+strings.Join(g.Aliases, ", ")+")")
	}
	return GPUSpec{}, fmt.Errorf("unknown GPU model %q (known: %s)", name, strings.Join(known, "; "))
}

// Calibration overrides catalog efficiencies with measurements, per GPU
// model (catalog name or alias). Fields left out keep the catalog default.
//
//	gpus:
//	  H100-SXM-80G: {hbm: 0.83, gemm: 0.72, kernel_overhead_us: 2.5}
type Calibration struct {
	GPUs map[string]CalibrationEntry `yaml:"gpus" json:"gpus"`
}

// CalibrationEntry is one GPU model's measured efficiencies; nil keeps the default.
type CalibrationEntry struct {
	HBM              *float64 `yaml:"hbm,omitempty" json:"hbm,omitempty"`
	GEMM             *float64 `yaml:"gemm,omitempty" json:"gemm,omitempty"`
	KernelOverheadUS *float64 `yaml:"kernel_overhead_us,omitempty" json:"kernel_overhead_us,omitempty"`
	NVLink           *float64 `yaml:"nvlink,omitempty" json:"nvlink,omitempty"`
	NVLinkLatencyUS  *float64 `yaml:"nvlink_latency_us,omitempty" json:"nvlink_latency_us,omitempty"`
	PCIe             *float64 `yaml:"pcie,omitempty" json:"pcie,omitempty"`
	PCIeLatencyUS    *float64 `yaml:"pcie_latency_us,omitempty" json:"pcie_latency_us,omitempty"`
	NIC              *float64 `yaml:"nic,omitempty" json:"nic,omitempty"`
	NICLatencyUS     *float64 `yaml:"nic_latency_us,omitempty" json:"nic_latency_us,omitempty"`
	TCPLatencyUS     *float64 `yaml:"tcp_latency_us,omitempty" json:"tcp_latency_us,omitempty"`
}

// ParseCalibration reads a calibration YAML/JSON strictly and checks ranges.
func ParseCalibration(data []byte) (*Calibration, error) {
	var c Calibration
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("calibration: %w (known fields: hbm, gemm, kernel_overhead_us, nvlink, nvlink_latency_us, pcie, pcie_latency_us, nic, nic_latency_us, tcp_latency_us)", err)
	}
	names := make([]string, 0, len(c.GPUs))
	for n := range c.GPUs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if _, err := LookupGPU(n); err != nil {
			return nil, fmt.Errorf("calibration: %w", err)
		}
		e := c.GPUs[n]
		for _, f := range []struct {
			name string
			v    *float64
			max  float64
		}{{"hbm", e.HBM, 1}, {"gemm", e.GEMM, 1}, {"nvlink", e.NVLink, 1}, {"pcie", e.PCIe, 1}, {"nic", e.NIC, 1},
			{"kernel_overhead_us", e.KernelOverheadUS, 1000}, {"nvlink_latency_us", e.NVLinkLatencyUS, 10000},
			{"pcie_latency_us", e.PCIeLatencyUS, 10000},
			{"nic_latency_us", e.NICLatencyUS, 100000}, {"tcp_latency_us", e.TCPLatencyUS, 100000}} {
			if f.v != nil && (*f.v <= 0 || *f.v > f.max) {
				return nil, fmt.Errorf("calibration: %s.%s = %g is outside (0, %g]", n, f.name, *f.v, f.max)
			}
		}
	}
	return &c, nil
}

// LoadCalibration reads a calibration file.
func LoadCalibration(path string) (*Calibration, error) {
	return loadFile(path, "calibration", ParseCalibration)
}

// apply returns def overridden by the entry for GPU model name.
func (c *Calibration) apply(name string, def Efficiency) Efficiency {
	if c == nil {
		return def
	}
	for key, e := range c.GPUs {
		g, err := LookupGPU(key)
		if err != nil || g.Name != name {
			continue
		}
		set := func(dst *float64, v *float64) {
			if v != nil {
				*dst = *v
			}
		}
		set(&def.HBM, e.HBM)
		set(&def.GEMM, e.GEMM)
		set(&def.KernelOverheadUS, e.KernelOverheadUS)
		set(&def.NVLink, e.NVLink)
		set(&def.NVLinkLatencyUS, e.NVLinkLatencyUS)
		set(&def.PCIe, e.PCIe)
		set(&def.PCIeLatencyUS, e.PCIeLatencyUS)
		set(&def.NIC, e.NIC)
		set(&def.NICLatencyUS, e.NICLatencyUS)
		set(&def.TCPLatencyUS, e.TCPLatencyUS)
	}
	return def
}

// nicGBps is a NIC's achievable bandwidth in GB/s.
func nicGBps(n NIC, e Efficiency) float64 { return n.Gbps / 8 * e.NIC }

func nicLatencyS(n NIC, e Efficiency) float64 {
	if n.RDMA {
		return e.NICLatencyUS * 1e-6
	}
	return e.TCPLatencyUS * 1e-6
}

// Package topology plans how a GLM-4.5-class model is split over a set of
// multi-GPU hosts: the inventory, a hardware catalog, per-GPU memory
// accounting, a cost model of decode and prefill, and the placement search
// that `glmtopo plan` and the node daemons share.
package topology

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"regexp"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Inventory is the set of hosts a plan may use. Node daemons build it from
// detected hardware; users write it as YAML (see ParseInventory).
type Inventory struct {
	Hosts []Host `yaml:"hosts" json:"hosts"`
}

// Host is one machine: a number of identical GPUs joined by one intra-host
// interconnect, and the NICs that reach the other hosts.
type Host struct {
	Name    string `yaml:"name" json:"name"`
	Address string `yaml:"address,omitempty" json:"address,omitempty"`
	// GPU is a catalog model name or alias (see GPUModels), e.g. "H100-80G".
	GPU  string `yaml:"gpu" json:"gpu"`
	GPUs int    `yaml:"gpus" json:"gpus"`
	// GPUMemory is the memory of one GPU as the driver reports it, in bytes;
	// 0 takes the catalog's figure. YAML and JSON also accept "80GB", "79.6GiB".
	GPUMemory ByteSize `yaml:"gpu_memory,omitempty" json:"gpu_memory,omitempty"`
	// Interconnect joins the host's GPUs: "nvlink" (NVLink/NVSwitch, or the
	// GPU's peer fabric such as Infinity Fabric) or "pcie". Empty takes the
	// catalog default of the GPU.
	Interconnect string `yaml:"interconnect,omitempty" json:"interconnect,omitempty"`
	NICs         []NIC  `yaml:"nics,omitempty" json:"nics,omitempty"`
}

// NIC is a network interface that reaches the other hosts.
type NIC struct {
	Name string  `yaml:"name" json:"name"`
	RDMA bool    `yaml:"rdma" json:"rdma"`
	Gbps float64 `yaml:"gbps" json:"gbps"`
}

// Interconnect kinds.
const (
	InterconnectNVLink = "nvlink"
	InterconnectPCIe   = "pcie"
)

// DefaultNIC is what a host without listed NICs is assumed to have: a plain
// 100 Gb/s Ethernet port, the conservative case.
var defaultNIC = NIC{Name: "eth0", RDMA: false, Gbps: 100}

// ByteSize is a number of bytes that reads from YAML/JSON as an integer or
// as a string with a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB).
type ByteSize int64

var byteUnits = map[string]float64{
	"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
	"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
}

// ParseByteSize reads "80GB", "79.6GiB", "81559MiB" or a plain byte count.
func ParseByteSize(s string) (ByteSize, error) {
	s = strings.TrimSpace(s)
	i := strings.IndexFunc(s, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	num, unit := s, "B"
	if i >= 0 {
		num, unit = strings.TrimSpace(s[:i]), strings.TrimSpace(s[i:])
	}
	mult, ok := byteUnits[strings.ToUpper(unit)]
	if !ok {
		return 0, fmt.Errorf("size %q: unknown unit %q (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)", s, unit)
	}
	v, err := strconv.ParseFloat(num, 64)
	if err != nil || v < 0 || math.IsInf(v, 0) || v*mult > math.MaxInt64/2 {
		return 0, fmt.Errorf("size %q: not a non-negative number with a unit", s)
	}
	return ByteSize(v * mult), nil
}

// UnmarshalYAML accepts an integer or a string with a unit.
func (b *ByteSize) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return fmt.Errorf("line %d: size must be a number or a string like 80GB", n.Line)
	}
	v, err := ParseByteSize(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %w", n.Line, err)
	}
	*b = v
	return nil
}

// UnmarshalJSON accepts an integer or a string with a unit.
func (b *ByteSize) UnmarshalJSON(data []byte) error {
	s := strings.Trim(string(data), `"`)
	v, err := ParseByteSize(s)
	if err != nil {
		return err
	}
	*b = v
	return nil
}

// GiB is the size in GiB.
func (b ByteSize) GiB() float64 { return float64(b) / (1 << 30) }

// ParseInventory reads an inventory YAML (or JSON, a YAML subset) strictly:
// unknown fields and unknown GPU models are errors.
//
//	hosts:
//	  - name: a
//	    address: 10.0.0.1
//	    gpu: H100-80G
//	    gpus: 4
//	    gpu_memory: 80GiB        # optional, catalog default
//	    interconnect: nvlink     # nvlink | pcie
//	    nics: [{name: ib0, rdma: true, gbps: 400}]
func ParseInventory(data []byte) (Inventory, error) {
	var inv Inventory
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&inv); err != nil {
		if errors.Is(err, io.EOF) {
			return inv, errors.New("inventory: empty document (want hosts: [...])")
		}
		return inv, fmt.Errorf("inventory: %w (known host fields: name, address, gpu, gpus, gpu_memory, interconnect, nics; nic fields: name, rdma, gbps)", err)
	}
	if err := inv.Validate(); err != nil {
		return inv, err
	}
	return inv, nil
}

// LoadInventory reads and parses an inventory file.
func LoadInventory(path string) (Inventory, error) {
	return loadFile(path, "inventory", ParseInventory)
}

var shorthandRE = regexp.MustCompile(`^(\d+)x(\d+)x([A-Za-z0-9][A-Za-z0-9._-]*)$`)

// ParseHosts reads the shorthand "2x4xH100-80G" or "1x4xH200,1x4xH100-80G":
// comma-separated HOSTSxGPUSxMODEL groups. Hosts are named host0, host1, …
// and get the catalog interconnect and one 100 Gb/s Ethernet NIC (use an
// inventory file to describe RDMA NICs).
func ParseHosts(s string) (Inventory, error) {
	var inv Inventory
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		m := shorthandRE.FindStringSubmatch(part)
		if m == nil {
			return inv, fmt.Errorf("hosts %q: group %q is not HOSTSxGPUSxMODEL (e.g. 2x4xH100-80G)", s, part)
		}
		nHosts, err1 := strconv.Atoi(m[1])
		nGPUs, err2 := strconv.Atoi(m[2])
		if err1 != nil || err2 != nil || nHosts < 1 || nHosts > 1024 || nGPUs < 1 || nGPUs > 64 {
			return inv, fmt.Errorf("hosts %q: group %q: want 1..1024 hosts of 1..64 GPUs", s, part)
		}
		if _, err := LookupGPU(m[3]); err != nil {
			return inv, fmt.Errorf("hosts %q: %w", s, err)
		}
		for i := 0; i < nHosts; i++ {
			inv.Hosts = append(inv.Hosts, Host{
				Name: fmt.Sprintf("host%d", len(inv.Hosts)), GPU: m[3], GPUs: nGPUs,
			})
		}
	}
	if err := inv.Validate(); err != nil {
		return inv, err
	}
	return inv, nil
}

// Validate checks names, counts, GPU models, interconnects and NICs.
func (inv Inventory) Validate() error {
	if len(inv.Hosts) == 0 {
		return errors.New("inventory: no hosts")
	}
	seen := map[string]bool{}
	for i, h := range inv.Hosts {
		where := fmt.Sprintf("inventory: host %d (%s)", i, h.Name)
		if h.Name == "" {
			return fmt.Errorf("inventory: host %d: name is required", i)
		}
		if seen[h.Name] {
			return fmt.Errorf("%s: duplicate host name", where)
		}
		seen[h.Name] = true
		if _, err := LookupGPU(h.GPU); err != nil {
			return fmt.Errorf("%s: %w", where, err)
		}
		if h.GPUs < 1 || h.GPUs > 64 {
			return fmt.Errorf("%s: gpus must be 1..64, got %d", where, h.GPUs)
		}
		if h.GPUMemory < 0 || (h.GPUMemory > 0 && h.GPUMemory < 1<<30) {
			return fmt.Errorf("%s: gpu_memory %d bytes is implausible (want at least 1GiB)", where, h.GPUMemory)
		}
		switch h.Interconnect {
		case "", InterconnectNVLink, InterconnectPCIe:
		default:
			return fmt.Errorf("%s: interconnect %q is unknown (nvlink, pcie)", where, h.Interconnect)
		}
		for j, n := range h.NICs {
			if n.Name == "" {
				return fmt.Errorf("%s: nic %d: name is required", where, j)
			}
			if n.Gbps <= 0 || n.Gbps > 100000 {
				return fmt.Errorf("%s: nic %s: gbps must be in (0, 100000], got %g", where, n.Name, n.Gbps)
			}
		}
	}
	return nil
}

// hostHW is a host resolved against the catalog and calibration.
type hostHW struct {
	index  int
	host   Host
	gpu    GPUSpec
	eff    Efficiency
	memory int64 // bytes per GPU
	nvlink bool
	nic    NIC    // the fastest NIC
	key    string // identifies identical hardware, for memoization
}

// peer returns one GPU's achievable one-direction bandwidth to its peers
// inside the host (bytes/s) and the latency of one collective step (s).
func (h *hostHW) peer() (bw, lat float64) {
	if h.nvlink {
		return h.gpu.NVLinkGBps * 1e9 * h.eff.NVLink, h.eff.NVLinkLatencyUS * 1e-6
	}
	return h.gpu.PCIeGBps * 1e9 * h.eff.PCIe, h.eff.PCIeLatencyUS * 1e-6
}

func resolveHosts(inv Inventory, cal *Calibration) ([]hostHW, error) {
	if err := inv.Validate(); err != nil {
		return nil, err
	}
	out := make([]hostHW, len(inv.Hosts))
	for i, h := range inv.Hosts {
		spec, _ := LookupGPU(h.GPU)
		hw := hostHW{index: i, host: h, gpu: spec, eff: spec.Efficiency, memory: int64(h.GPUMemory)}
		if hw.memory == 0 {
			hw.memory = spec.MemoryBytes
		}
		hw.eff = cal.apply(spec.Name, spec.Efficiency)
		switch h.Interconnect {
		case InterconnectNVLink:
			if spec.NVLinkGBps == 0 {
				return nil, fmt.Errorf("inventory: host %s: %s has no NVLink; use interconnect: pcie", h.Name, spec.Name)
			}
			hw.nvlink = true
		case InterconnectPCIe:
		default:
			hw.nvlink = spec.NVLinkGBps > 0 && spec.DefaultInterconnect == InterconnectNVLink
		}
		hw.nic = defaultNIC
		for j, n := range h.NICs {
			if j == 0 || nicGBps(n, hw.eff) > nicGBps(hw.nic, hw.eff) {
				hw.nic = n
			}
		}
		hw.key = fmt.Sprintf("%s/%d/%t/%+v", spec.Name, hw.memory, hw.nvlink, hw.eff)
		out[i] = hw
	}
	return out, nil
}

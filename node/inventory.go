package node

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/shirou/gopsutil/v4/cpu"
	"github.com/shirou/gopsutil/v4/mem"
	"go.yaml.in/yaml/v3"
)

// HostInventory is the hardware of one host as the planner needs it.
type HostInventory struct {
	Hostname    string      `json:"hostname" yaml:"hostname" msgpack:"hostname"`
	CPUModel    string      `json:"cpu_model" yaml:"cpu_model" msgpack:"cpu_model"`
	CPUCores    int         `json:"cpu_cores" yaml:"cpu_cores" msgpack:"cpu_cores"`       // physical
	CPUThreads  int         `json:"cpu_threads" yaml:"cpu_threads" msgpack:"cpu_threads"` // logical
	MemoryBytes uint64      `json:"memory_bytes" yaml:"memory_bytes" msgpack:"memory_bytes"`
	NUMANodes   []NUMANode  `json:"numa_nodes,omitempty" yaml:"numa_nodes,omitempty" msgpack:"numa_nodes"`
	GPUs        []GPU       `json:"gpus,omitempty" yaml:"gpus,omitempty" msgpack:"gpus"`
	RDMA        []RDMANIC   `json:"rdma,omitempty" yaml:"rdma,omitempty" msgpack:"rdma"`
	Interfaces  []Interface `json:"interfaces,omitempty" yaml:"interfaces,omitempty" msgpack:"interfaces"`
	// Source is "detected" or the override file it was read from.
	Source string `json:"source" yaml:"source,omitempty" msgpack:"source"`
	// Notes records what could not be detected (e.g. "no NVML: CPU-only host").
	Notes []string `json:"notes,omitempty" yaml:"notes,omitempty" msgpack:"notes"`
}

// NUMANode is one NUMA node: its CPUs (kernel cpulist syntax) and memory.
type NUMANode struct {
	ID          int    `json:"id" yaml:"id" msgpack:"id"`
	CPUs        string `json:"cpus" yaml:"cpus" msgpack:"cpus"`
	MemoryBytes uint64 `json:"memory_bytes" yaml:"memory_bytes" msgpack:"memory_bytes"`
}

// GPU is one NVIDIA GPU as NVML reports it.
type GPU struct {
	Index       int    `json:"index" yaml:"index" msgpack:"index"`
	Name        string `json:"name" yaml:"name" msgpack:"name"`
	MemoryBytes uint64 `json:"memory_bytes" yaml:"memory_bytes" msgpack:"memory_bytes"`
	UUID        string `json:"uuid" yaml:"uuid" msgpack:"uuid"`
	PCIBusID    string `json:"pci_bus_id" yaml:"pci_bus_id" msgpack:"pci_bus_id"`
	NVLinks     int    `json:"nvlink_active_links" yaml:"nvlink_active_links" msgpack:"nvlink_active_links"`
}

// RDMANIC is one RDMA device port and the network device it is bound to.
type RDMANIC struct {
	Device   string  `json:"rdma_device" yaml:"rdma_device" msgpack:"rdma_device"`
	Port     int     `json:"port" yaml:"port" msgpack:"port"`
	Netdev   string  `json:"netdev,omitempty" yaml:"netdev,omitempty" msgpack:"netdev"`
	State    string  `json:"state" yaml:"state" msgpack:"state"` // e.g. ACTIVE, DOWN
	RateGbps float64 `json:"rate_gbps" yaml:"rate_gbps" msgpack:"rate_gbps"`
	LinkType string  `json:"link_layer,omitempty" yaml:"link_layer,omitempty" msgpack:"link_layer"` // InfiniBand or Ethernet
}

// Interface is a network interface that is up, with its addresses (CIDR).
type Interface struct {
	Name  string   `json:"name" yaml:"name" msgpack:"name"`
	MTU   int      `json:"mtu" yaml:"mtu" msgpack:"mtu"`
	Addrs []string `json:"addrs,omitempty" yaml:"addrs,omitempty" msgpack:"addrs"`
}

// InventorySource detects the local host; the zero value uses the real
// system paths.
type InventorySource struct {
	SysRoot  string // "" means "/sys"
	NVMLPath string // "" tries the usual libnvidia-ml names
}

// Detect probes the local host. Missing parts (no NVML, no RDMA)
// are recorded in Notes, not returned as errors: a host without NVML is a
// CPU-only host.
func (s InventorySource) Detect(ctx context.Context) (HostInventory, error) {
	sys := s.SysRoot
	if sys == "" {
		sys = "/sys"
	}
	inv := HostInventory{Source: "detected"}
	var err error
	if inv.Hostname, err = os.Hostname(); err != nil {
		return inv, fmt.Errorf("hostname: %w", err)
	}
	if infos, err := cpu.InfoWithContext(ctx); err == nil && len(infos) > 0 {
		inv.CPUModel = infos[0].ModelName
	} else if err != nil {
		inv.Notes = append(inv.Notes, "cpu info: "+err.Error())
	}
	if n, err := cpu.CountsWithContext(ctx, false); err == nil {
		inv.CPUCores = n
	}
	if n, err := cpu.CountsWithContext(ctx, true); err == nil {
		inv.CPUThreads = n
	}
	if vm, err := mem.VirtualMemoryWithContext(ctx); err == nil {
		inv.MemoryBytes = vm.Total
	} else {
		inv.Notes = append(inv.Notes, "memory: "+err.Error())
	}
	inv.NUMANodes = readNUMANodes(filepath.Join(sys, "devices/system/node"))
	gpus, err := detectGPUs(s.NVMLPath)
	if err != nil {
		inv.Notes = append(inv.Notes, "no GPUs: "+err.Error())
	}
	inv.GPUs = gpus
	inv.RDMA = detectRDMA(filepath.Join(sys, "class/infiniband"))
	if inv.Interfaces, err = detectInterfaces(); err != nil {
		inv.Notes = append(inv.Notes, "interfaces: "+err.Error())
	}
	return inv, nil
}

// readNUMANodes reads /sys/devices/system/node/nodeN/{cpulist,meminfo}.
func readNUMANodes(dir string) []NUMANode {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	var nodes []NUMANode
	for _, e := range entries {
		id, err := strconv.Atoi(strings.TrimPrefix(e.Name(), "node"))
		if err != nil || !strings.HasPrefix(e.Name(), "node") {
			continue
		}
		n := NUMANode{ID: id}
		if b, err := os.ReadFile(filepath.Join(dir, e.Name(), "cpulist")); err == nil {
			n.CPUs = strings.TrimSpace(string(b))
		}
		if b, err := os.ReadFile(filepath.Join(dir, e.Name(), "meminfo")); err == nil {
			n.MemoryBytes = parseNodeMemTotal(string(b))
		}
		nodes = append(nodes, n)
	}
	sort.Slice(nodes, func(i, j int) bool { return nodes[i].ID < nodes[j].ID })
	return nodes
}

// parseNodeMemTotal finds "Node 0 MemTotal:  263856440 kB".
func parseNodeMemTotal(meminfo string) uint64 {
	for _, line := range strings.Split(meminfo, "\n") {
		f := strings.Fields(line)
		if len(f) >= 4 && f[2] == "MemTotal:" {
			kb, err := strconv.ParseUint(f[3], 10, 64)
			if err == nil {
				return kb * 1024
			}
		}
	}
	return 0
}

func detectInterfaces() ([]Interface, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, err
	}
	var out []Interface
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagUp == 0 {
			continue
		}
		it := Interface{Name: ifc.Name, MTU: ifc.MTU}
		addrs, _ := ifc.Addrs()
		for _, a := range addrs {
			it.Addrs = append(it.Addrs, a.String())
		}
		out = append(out, it)
	}
	return out, nil
}

// LoadInventory reads an inventory file (YAML or JSON) that replaces
// detection.
func LoadInventory(path string) (HostInventory, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return HostInventory{}, fmt.Errorf("inventory override: %w", err)
	}
	var inv HostInventory
	dec := yaml.NewDecoder(strings.NewReader(string(b)))
	dec.KnownFields(true)
	if err := dec.Decode(&inv); err != nil {
		return HostInventory{}, fmt.Errorf("inventory override %s: %w", path, err)
	}
	if inv.Hostname == "" {
		return HostInventory{}, fmt.Errorf("inventory override %s: hostname is required", path)
	}
	for i, g := range inv.GPUs {
		if g.MemoryBytes == 0 {
			return HostInventory{}, fmt.Errorf("inventory override %s: gpu %d has no memory_bytes", path, i)
		}
	}
	inv.Source = path
	return inv, nil
}

// WriteInventoryTable prints inv for people.
func WriteInventoryTable(w io.Writer, inv HostInventory) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "host\t%s\t(%s)\n", inv.Hostname, inv.Source)
	fmt.Fprintf(tw, "cpu\t%s\t%d cores / %d threads\n", inv.CPUModel, inv.CPUCores, inv.CPUThreads)
	fmt.Fprintf(tw, "memory\t%s\t\n", humanBytes(inv.MemoryBytes))
	for _, n := range inv.NUMANodes {
		fmt.Fprintf(tw, "numa %d\tcpus %s\t%s\n", n.ID, n.CPUs, humanBytes(n.MemoryBytes))
	}
	if len(inv.GPUs) == 0 {
		fmt.Fprintf(tw, "gpus\tnone (CPU-only host)\t\n")
	}
	for _, g := range inv.GPUs {
		fmt.Fprintf(tw, "gpu %d\t%s\t%s  %s  %s  nvlink %d\n", g.Index, g.Name, humanBytes(g.MemoryBytes), g.PCIBusID, g.UUID, g.NVLinks)
	}
	for _, r := range inv.RDMA {
		fmt.Fprintf(tw, "rdma %s/%d\t%s\t%s %g Gb/s %s\n", r.Device, r.Port, orDash(r.Netdev), r.State, r.RateGbps, r.LinkType)
	}
	for _, it := range inv.Interfaces {
		fmt.Fprintf(tw, "if %s\tmtu %d\t%s\n", it.Name, it.MTU, strings.Join(it.Addrs, " "))
	}
	for _, n := range inv.Notes {
		fmt.Fprintf(tw, "note\t%s\n", strings.Join(strings.Fields(n), " ")) // one line per note
	}
	return tw.Flush()
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func humanBytes(b uint64) string {
	const gib = 1 << 30
	if b >= gib {
		return fmt.Sprintf("%.1f GiB", float64(b)/gib)
	}
	return fmt.Sprintf("%d MiB", b>>20)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

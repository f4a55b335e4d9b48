package node

import (
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/Mellanox/rdmamap"
)

// detectRDMA lists RDMA device ports under classDir (/sys/class/infiniband)
// with their state, rate and bound netdev.
func detectRDMA(classDir string) []RDMANIC {
	entries, err := os.ReadDir(classDir)
	if err != nil {
		return nil
	}
	netdevOf := rdmaNetdevs()
	var out []RDMANIC
	for _, e := range entries {
		dev := e.Name()
		ports, err := os.ReadDir(filepath.Join(classDir, dev, "ports"))
		if err != nil {
			continue
		}
		for _, p := range ports {
			num, err := strconv.Atoi(p.Name())
			if err != nil {
				continue
			}
			dir := filepath.Join(classDir, dev, "ports", p.Name())
			nic := RDMANIC{Device: dev, Port: num, Netdev: netdevOf[dev]}
			nic.State = parsePortState(readTrim(filepath.Join(dir, "state")))
			nic.RateGbps = parsePortRate(readTrim(filepath.Join(dir, "rate")))
			nic.LinkType = readTrim(filepath.Join(dir, "link_layer"))
			out = append(out, nic)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Device != out[j].Device {
			return out[i].Device < out[j].Device
		}
		return out[i].Port < out[j].Port
	})
	return out
}

// rdmaNetdevs maps RDMA device → netdev using rdmamap (GID tables for
// RoCE, GUIDs for InfiniBand).
func rdmaNetdevs() map[string]string {
	m := map[string]string{}
	ifs, err := net.Interfaces()
	if err != nil {
		return m
	}
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		if dev, err := rdmamap.GetRdmaDeviceForNetdevice(ifc.Name); err == nil && dev != "" {
			if _, seen := m[dev]; !seen {
				m[dev] = ifc.Name
			}
		}
	}
	return m
}

// parsePortState turns "4: ACTIVE" into "ACTIVE".
func parsePortState(s string) string {
	if i := strings.IndexByte(s, ':'); i >= 0 {
		return strings.TrimSpace(s[i+1:])
	}
	return s
}

// parsePortRate turns "400 Gb/sec (4X NDR)" into 400.
func parsePortRate(s string) float64 {
	f := strings.Fields(s)
	if len(f) == 0 {
		return 0
	}
	v, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return 0
	}
	return v
}

func readTrim(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

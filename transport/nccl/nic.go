package nccl

import (
	"bufio"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

// NIC is an RDMA port as the inventory reports it (node.RDMANIC).
type NIC struct {
	Device   string // mlx5_0
	Port     int
	Netdev   string // its Ethernet/IPoIB interface, "" if none
	RateGbps float64
	State    string // ACTIVE
}

// NICChoice is what the planner (or flags) picked for a stage pair.
type NICChoice struct {
	NICs   []NIC  // the host's RDMA ports
	HCA    string // --nccl-ib-hca: overrides the inventory
	Ifname string // --nccl-socket-ifname: overrides the inventory
}

// Env returns the NCCL_* settings for the choice and which of them the
// user's environment (getenv) already sets: the user's own NCCL_* always
// wins. Without a flag, the fastest ACTIVE RDMA port is chosen, and its
// netdev carries NCCL's sockets (bootstrap, and NET/Socket if IB fails).
func Env(c NICChoice, getenv func(string) string) (set map[string]string, kept []string) {
	want := map[string]string{}
	hca, ifname := c.HCA, c.Ifname
	if hca == "" {
		var best *NIC
		for i := range c.NICs {
			n := &c.NICs[i]
			if strings.EqualFold(n.State, "ACTIVE") && (best == nil || n.RateGbps > best.RateGbps) {
				best = n
			}
		}
		if best != nil {
			hca = fmt.Sprintf("=%s:%d", best.Device, best.Port) // "=": exact device name, not a prefix
			if ifname == "" {
				ifname = best.Netdev
			}
		}
	}
	if hca != "" {
		want["NCCL_IB_HCA"] = hca
	}
	if ifname != "" {
		want["NCCL_SOCKET_IFNAME"] = ifname
	}
	set = map[string]string{}
	for k, v := range want {
		if getenv(k) != "" {
			kept = append(kept, k+"="+getenv(k))
			continue
		}
		set[k] = v
	}
	return set, kept
}

// ApplyEnv sets the chosen variables in this process (before the first NCCL
// call: NCCL reads them once) and logs what was chosen and kept.
func ApplyEnv(c NICChoice, log *slog.Logger) error {
	set, kept := Env(c, os.Getenv)
	for k, v := range set {
		if err := os.Setenv(k, v); err != nil {
			return err
		}
	}
	log.Info("nccl: network interfaces", "set", set, "user_env_kept", kept)
	return nil
}

// EnableTransportLog makes NCCL write its INIT/NET log to a file in dir
// (unless the user set NCCL_DEBUG), so TransportTaken can report which
// network NCCL used: it falls back from IB to sockets without an error.
// Call before the first NCCL call; returns the file pattern.
func EnableTransportLog(dir string) string {
	if os.Getenv("NCCL_DEBUG") != "" {
		return os.Getenv("NCCL_DEBUG_FILE")
	}
	pattern := filepath.Join(dir, "glmtopo-nccl.%h.%p.log")
	os.Setenv("NCCL_DEBUG", "INFO")
	os.Setenv("NCCL_DEBUG_SUBSYS", "INIT,NET")
	os.Setenv("NCCL_DEBUG_FILE", pattern)
	return pattern
}

var (
	usingNetwork = regexp.MustCompile(`Using network (\S+)`)
	channelVia   = regexp.MustCompile(`via (NET/\S+|P2P/\S+|SHM/\S+|P2P|SHM)`)
)

// TransportTaken reads an NCCL log (as EnableTransportLog configured it,
// with %h and %p expanded) and returns the network plugin NCCL chose and
// the distinct channel transports it connected (e.g. "Socket",
// ["NET/Socket/0"]).
func TransportTaken(logPath string) (network string, via []string, err error) {
	f, err := os.Open(logPath)
	if err != nil {
		return "", nil, err
	}
	defer f.Close()
	seen := map[string]bool{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if m := usingNetwork.FindStringSubmatch(line); m != nil {
			network = m[1]
		}
		if m := channelVia.FindStringSubmatch(line); m != nil && !seen[m[1]] {
			seen[m[1]] = true
			via = append(via, m[1])
		}
	}
	return network, via, sc.Err()
}

// LogPath expands EnableTransportLog's pattern for this process.
func LogPath(pattern string) string {
	host, _ := os.Hostname()
	p := strings.ReplaceAll(pattern, "%h", host)
	return strings.ReplaceAll(p, "%p", fmt.Sprint(os.Getpid()))
}

package node

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// multicastWorks finds an up, non-loopback, multicast-capable IPv4
// interface on which a datagram sent to a multicast group comes back to a
// listener on this host, as mDNS between local daemons needs. It returns the
// interface name or why not.
func multicastWorks() (string, string) {
	ifs, err := net.Interfaces()
	if err != nil {
		return "", err.Error()
	}
	why := "no up, multicast-capable IPv4 interface"
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagUp == 0 || ifc.Flags&net.FlagLoopback != 0 || ifc.Flags&net.FlagMulticast == 0 {
			continue
		}
		addrs, _ := ifc.Addrs()
		hasV4 := false
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil {
				hasV4 = true
			}
		}
		if !hasV4 {
			continue
		}
		group := &net.UDPAddr{IP: net.IPv4(239, 255, 77, 77), Port: 40000 + os.Getpid()%20000}
		l, err := net.ListenMulticastUDP("udp4", &ifc, group)
		if err != nil {
			why = fmt.Sprintf("%s: join multicast group: %v", ifc.Name, err)
			continue
		}
		c, err := net.DialUDP("udp4", nil, group)
		if err == nil {
			c.Write([]byte("glmtopo-probe"))
			c.Close()
			l.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
			buf := make([]byte, 64)
			n, _, rerr := l.ReadFromUDP(buf)
			l.Close()
			if rerr == nil && string(buf[:n]) == "glmtopo-probe" {
				return ifc.Name, ""
			}
			why = fmt.Sprintf("%s: multicast datagram did not loop back", ifc.Name)
			continue
		}
		l.Close()
		why = fmt.Sprintf("%s: %v", ifc.Name, err)
	}
	return "", why
}

// TestMDNSDiscovery starts three daemons with no static peers: they must
// find each other by mDNS and agree on a plan.
func TestMDNSDiscovery(t *testing.T) {
	ifc, why := multicastWorks()
	if ifc == "" {
		t.Skipf("multicast does not work on this machine (%s); mDNS discovery not tested", why)
	}
	t.Parallel()
	dir := t.TempDir()
	key := writeClusterKey(t, dir, "cluster.key")
	names := []string{"m1", "m2", "m3"}
	var procs []*daemonProc
	for _, n := range names {
		writeInventory(t, dir, n)
		sd := filepath.Join(dir, n)
		procs = append(procs, startDaemon(t, n, sd, nil, nodeArgs(dir, n, sd, "127.0.0.1:0", key, "--expect", "3", "--mdns=true")...))
	}
	eventually(t, 15*time.Second, "mDNS discovery on "+ifc, func() string {
		_, why := clusterAgrees(procs, StateActive, names)
		return why
	})
}

// TestNetnsDiscovery builds three network namespaces joined by veth pairs to
// a bridge (itself in a fourth namespace, so the host's network is not
// touched) and runs one daemon in each: n1 and n2 find each other by mDNS,
// n3 knows only n1's address. It needs root and iproute2.
func TestNetnsDiscovery(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	ipCmd, err := exec.LookPath("ip")
	if err != nil {
		t.Skip("needs iproute2 (ip) to create network namespaces")
	}
	t.Parallel()
	tag := fmt.Sprintf("gt%d", os.Getpid()%100000)
	brNS := tag + "br"
	ip := func(args ...string) error {
		out, err := exec.Command(ipCmd, args...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	if err := ip("netns", "add", brNS); err != nil {
		t.Skipf("cannot create network namespaces here: %v", err)
	}
	t.Cleanup(func() { ip("netns", "del", brNS) })
	setup := [][]string{
		// No multicast snooping: without an IGMP querier a snooping bridge may
		// drop the mDNS group's traffic; a plain LAN switch floods it.
		{"-n", brNS, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0", "forward_delay", "0"},
		{"-n", brNS, "link", "set", "br0", "up"},
		{"-n", brNS, "link", "set", "lo", "up"},
	}
	names := []string{"n1", "n2", "n3"}
	for i, n := range names {
		ns := tag + n
		if err := ip("netns", "add", ns); err != nil {
			t.Skipf("cannot create network namespaces here: %v", err)
		}
		t.Cleanup(func() { ip("netns", "del", ns) })
		host, port := fmt.Sprintf("v%s%d", tag, i), fmt.Sprintf("b%s%d", tag, i)
		setup = append(setup,
			[]string{"link", "add", host, "netns", ns, "type", "veth", "peer", "name", port, "netns", brNS},
			[]string{"-n", brNS, "link", "set", port, "master", "br0"},
			[]string{"-n", brNS, "link", "set", port, "up"},
			[]string{"-n", ns, "addr", "add", fmt.Sprintf("10.77.0.%d/24", i+1), "dev", host},
			[]string{"-n", ns, "link", "set", host, "up"},
			[]string{"-n", ns, "link", "set", "lo", "up"},
		)
	}
	for _, args := range setup {
		if err := ip(args...); err != nil {
			t.Skipf("cannot build the veth/bridge network: %v", err)
		}
	}
	// Start the daemons only once every link is up: mDNS binds to the
	// interfaces that are up when it starts, and a query sent while the
	// ports come up is lost (the next one is seconds later).
	eventually(t, 10*time.Second, "the veth/bridge links to come up", func() string {
		for i, n := range names {
			for _, l := range [][2]string{{tag + n, fmt.Sprintf("v%s%d", tag, i)}, {brNS, fmt.Sprintf("b%s%d", tag, i)}} {
				out, err := exec.Command(ipCmd, "-n", l[0], "-o", "link", "show", l[1]).CombinedOutput()
				if err != nil || !strings.Contains(string(out), "state UP") {
					return fmt.Sprintf("%s in %s: %s %v", l[1], l[0], strings.TrimSpace(string(out)), err)
				}
			}
		}
		return ""
	})
	dir := t.TempDir()
	key := writeClusterKey(t, dir, "cluster.key")
	var procs []*daemonProc
	for i, n := range names {
		writeInventory(t, dir, n)
		sd := filepath.Join(dir, n)
		listen := fmt.Sprintf("10.77.0.%d:7946", i+1)
		extra := []string{"--expect", "3", "--mdns=true", "--log-level", "debug"}
		if n == "n3" {
			extra = []string{"--expect", "3", "--mdns=false", "--peers", "10.77.0.1:7946"}
		}
		prefix := []string{ipCmd, "netns", "exec", tag + n}
		procs = append(procs, startDaemon(t, n, sd, prefix, nodeArgs(dir, n, sd, listen, key, extra...)...))
	}
	eventually(t, 20*time.Second, "discovery across namespaces", func() string {
		_, why := clusterAgrees(procs, StateActive, names)
		return why
	})
}

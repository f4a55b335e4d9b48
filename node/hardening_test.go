package node

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A second daemon on a listen address already in use fails at start with
// the address named, instead of sharing the port through SO_REUSEPORT.
func TestListenAddressInUse(t *testing.T) {
	ds := startInProcess(t, 1, nil)
	addr := ""
	for _, a := range ds[0].Addrs() {
		if strings.Contains(a, "/ip4/127.0.0.1/tcp/") {
			addr = a
		}
	}
	port := strings.Split(strings.TrimPrefix(addr, "/ip4/127.0.0.1/tcp/"), "/")[0]
	dir := t.TempDir()
	key, err := LoadClusterKey(writeClusterKey(t, dir, "k"))
	if err != nil {
		t.Fatal(err)
	}
	inv := HostInventory{Hostname: "second", Source: "test"}
	listen := "127.0.0.1:" + port
	d, err := Start(context.Background(), Options{
		StateDir: filepath.Join(dir, "second"), PSK: key, Model: "same", Listen: []string{listen},
		StartNow: true, Inventory: &inv, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err == nil {
		d.Close()
		t.Fatalf("a second daemon on %s started", listen)
	}
	if !strings.Contains(err.Error(), listen) || !strings.Contains(err.Error(), "already in use") {
		t.Fatalf("err %v; want one naming %s as in use", err, listen)
	}
}

// A daemon whose --peers cannot be reached, or answer with another cluster
// key, says so at info level (not only at debug).
func TestUnreachablePeersLoggedAtInfo(t *testing.T) {
	ds := startInProcess(t, 1, nil) // the cluster, with its own key
	target := ""
	for _, a := range ds[0].Addrs() {
		if strings.Contains(a, "/ip4/127.0.0.1/tcp/") {
			target = "127.0.0.1:" + strings.Split(strings.TrimPrefix(a, "/ip4/127.0.0.1/tcp/"), "/")[0]
		}
	}
	closed := fmt.Sprintf("127.0.0.1:%d", freePorts(t, 1)[0])
	dir := t.TempDir()
	otherKey, err := LoadClusterKey(writeClusterKey(t, dir, "other"))
	if err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	inv := HostInventory{Hostname: "stranger", Source: "test"}
	d, err := Start(context.Background(), Options{
		StateDir: filepath.Join(dir, "stranger"), PSK: otherKey, Model: "same", Listen: []string{"127.0.0.1:0"},
		Peers: []string{target, closed}, Expect: 2, Inventory: &inv, HeartbeatInterval: 100 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo})),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	eventually(t, 10*time.Second, "info lines for both peers", func() string {
		out := logs.String()
		for _, want := range []string{"peer=" + closed, "peer=" + target, "same --cluster-key-file"} {
			if !strings.Contains(out, want) {
				return fmt.Sprintf("log lacks %q:\n%s", want, out)
			}
		}
		return ""
	})
}

// The cluster's daemon says at info level that a host with another cluster
// key keeps trying to connect (libp2p drops such connections silently).
func TestForeignKeyJoinerLoggedAtInfo(t *testing.T) {
	var logs syncBuffer
	ds := startInProcess(t, 1, func(_ int, o *Options) {
		o.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	})
	target := ""
	for _, a := range ds[0].Addrs() {
		if strings.Contains(a, "/ip4/127.0.0.1/tcp/") {
			target = "127.0.0.1:" + strings.Split(strings.TrimPrefix(a, "/ip4/127.0.0.1/tcp/"), "/")[0]
		}
	}
	dir := t.TempDir()
	otherKey, err := LoadClusterKey(writeClusterKey(t, dir, "other"))
	if err != nil {
		t.Fatal(err)
	}
	inv := HostInventory{Hostname: "stranger", Source: "test"}
	d, err := Start(context.Background(), Options{
		StateDir: filepath.Join(dir, "stranger"), PSK: otherKey, Model: "same", Listen: []string{"127.0.0.1:0"},
		Peers: []string{target}, Expect: 2, Inventory: &inv, HeartbeatInterval: 100 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	eventually(t, 10*time.Second, "an info line about the stranger", func() string {
		if out := logs.String(); !strings.Contains(out, "failed the secure handshake") || !strings.Contains(out, "from=127.0.0.1") {
			return "log lacks it:\n" + out
		}
		return ""
	})
	if n := strings.Count(logs.String(), "failed the secure handshake"); n != 1 {
		t.Errorf("%d lines about one stranger, want 1 (rate-limited)", n)
	}
}

// One peer's repeated failures are reported once per interval, with a
// count of the ones held back; a success resets it.
func TestLogLimiter(t *testing.T) {
	now := time.Unix(0, 0)
	l := newLogLimiter(time.Minute, func() time.Time { return now })
	steps := []struct {
		advance    time.Duration
		key        string
		ok         bool
		suppressed int
	}{
		{0, "a", true, 0},
		{time.Second, "a", false, 0},
		{time.Second, "b", true, 0},
		{time.Second, "a", false, 0},
		{time.Minute, "a", true, 2},
		{time.Second, "a", false, 0},
	}
	for i, s := range steps {
		now = now.Add(s.advance)
		ok, n := l.allow(s.key)
		if ok != s.ok || n != s.suppressed {
			t.Fatalf("step %d: allow(%s) = %v, %d; want %v, %d", i, s.key, ok, n, s.ok, s.suppressed)
		}
	}
	l.reset("a")
	if ok, _ := l.allow("a"); !ok {
		t.Fatal("after reset the next failure was held back")
	}
}

package node

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

func TestStateDirLock(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	l1, err := lockStateDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	_, err = lockStateDir(dir)
	want := fmt.Sprintf("state dir %s is in use by pid %d", dir, os.Getpid())
	if err == nil || err.Error() != want {
		t.Fatalf("second lock: %v, want %q", err, want)
	}
	l1.Close()
	l2, err := lockStateDir(dir)
	if err != nil {
		t.Fatalf("lock after release: %v", err)
	}
	l2.Close()
}

func TestNodeKeyPersists(t *testing.T) {
	dir := t.TempDir()
	k1, err := loadOrCreateNodeKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	k2, err := loadOrCreateNodeKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !k1.Equals(k2) {
		t.Fatal("node key changed between loads")
	}
	os.WriteFile(filepath.Join(dir, keyFileName), []byte("junk"), 0o600)
	if _, err := loadOrCreateNodeKey(dir); err == nil {
		t.Fatal("corrupt key accepted")
	}
}

func TestLoadClusterKey(t *testing.T) {
	dir := t.TempDir()
	good, err := NewClusterKey()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, body, wantErr string
	}{
		{"generated", string(good), ""},
		{"short", "/key/swarm/psk/1.0.0/\n/base16/\nabcd", "cluster key"},
		{"bad header", "hello\n/base16/\n" + strings.Repeat("ab", 32) + "\n", "not a cluster key file"},
		{"bad hex", "/key/swarm/psk/1.0.0/\n/base16/\n" + strings.Repeat("zz", 32) + "\n", "cluster key"},
	}
	for _, tc := range tests {
		p := filepath.Join(dir, tc.name)
		os.WriteFile(p, []byte(tc.body), 0o600)
		psk, err := LoadClusterKey(p)
		if tc.wantErr == "" {
			if err != nil || len(psk) != 32 {
				t.Errorf("%s: %v", tc.name, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("%s: err %v, want %q", tc.name, err, tc.wantErr)
		}
	}
	other, _ := NewClusterKey()
	if bytes.Equal(good, other) {
		t.Error("two generated keys are equal")
	}
}

func TestRunClusterKey(t *testing.T) {
	p := filepath.Join(t.TempDir(), "cluster.key")
	var out, errb bytes.Buffer
	if err := RunClusterKey(context.Background(), []string{"--out", p}, &out, &errb); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadClusterKey(p); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v", fi.Mode())
	}
	if err := RunClusterKey(context.Background(), []string{"--out", p}, &out, &errb); err == nil {
		t.Fatal("overwrote an existing key")
	}
}

func TestDecodeMsgVersion(t *testing.T) {
	tests := []struct {
		version int
		wantErr string
	}{{wireVersion, ""}, {2, "unsupported wire version 2"}, {0, "unsupported wire version 0"}}
	for _, tc := range tests {
		b, _ := msgpack.Marshal(&heartbeatMsg{Version: tc.version, ID: "x", Seq: 7, Members: []memberDigest{{ID: "y", Addrs: []string{"/ip4/1.2.3.4/tcp/1"}}}})
		var hb heartbeatMsg
		err := decodeMsg(b, &hb)
		if tc.wantErr == "" {
			if err != nil || hb.Seq != 7 || hb.Members[0].Addrs[0] != "/ip4/1.2.3.4/tcp/1" {
				t.Errorf("v%d: %v %+v", tc.version, err, hb)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("v%d: err %v, want %q", tc.version, err, tc.wantErr)
		}
	}
	if err := decodeMsg([]byte{0xc1}, &heartbeatMsg{}); err == nil {
		t.Error("garbage decoded")
	}
	// A plan survives the wire with its inventory-free fields intact.
	plan := ClusterPlan{Epoch: 4, Stages: []StageAssignment{{HostID: "a", Layers: [2]int{3, 9}, Experts: []int{1, 2}, Next: &Neighbor{HostID: "b"}}}}
	b, _ := msgpack.Marshal(&planMsg{Version: wireVersion, Kind: planAssign, Plan: plan})
	var pm planMsg
	if err := decodeMsg(b, &pm); err != nil || pm.Plan.Stages[0].Layers != [2]int{3, 9} || pm.Plan.Stages[0].Next.HostID != "b" {
		t.Fatalf("%v %+v", err, pm.Plan)
	}
}

func TestParseHostAddr(t *testing.T) {
	tests := []struct {
		in, want, wantErr string
	}{
		{"10.0.0.2:7946", "/ip4/10.0.0.2/tcp/7946", ""},
		{"[fe80::1]:7946", "/ip6/fe80::1/tcp/7946", ""},
		{"gpu-a:7946", "/dns/gpu-a/tcp/7946", ""},
		{":7946", "/ip4/0.0.0.0/tcp/7946", ""},
		{"/ip4/10.0.0.2/tcp/7946", "/ip4/10.0.0.2/tcp/7946", ""},
		{"10.0.0.2", "", "want host:port"},
		{"10.0.0.2:99999", "", "bad port"},
		{"/ip4/nonsense", "", "address"},
		{"", "", "empty"},
	}
	for _, tc := range tests {
		a, err := parseHostAddr(tc.in)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%q: err %v, want %q", tc.in, err, tc.wantErr)
			}
			continue
		}
		if err != nil || a.String() != tc.want {
			t.Errorf("%q: got %v %v, want %s", tc.in, a, err, tc.want)
		}
	}
	sp, err := parseStaticPeer("/ip4/10.0.0.2/tcp/7946/p2p/12D3KooWBDcnb55ghs9hxkGSvSfnY7DyvL8jQMbdd7Ra1YScrHvc")
	if err != nil || !sp.pinned || sp.addr.String() != "/ip4/10.0.0.2/tcp/7946" {
		t.Fatalf("pinned peer: %+v %v", sp, err)
	}
	sp, err = parseStaticPeer("10.0.0.2:7946")
	if err != nil || sp.pinned || sp.id != "" {
		t.Fatalf("plain peer: %+v %v", sp, err)
	}
}

func TestRunNodeFlagErrors(t *testing.T) {
	dir := t.TempDir()
	key := writeClusterKey(t, dir, "k")
	base := []string{"--state-dir", filepath.Join(dir, "s"), "--listen", "127.0.0.1:0", "--mdns=false"}
	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{"no key", append(base, "--model", "m", "--expect", "2"), "--cluster-key-file is required"},
		{"no model", append(base, "--cluster-key-file", key, "--expect", "2"), "model is required"},
		{"no expect", append(base, "--cluster-key-file", key, "--model", "m"), "--expect N"},
		{"bad timing", append(base, "--cluster-key-file", key, "--model", "m", "--start-now", "--heartbeat-interval=1s", "--suspect-after=500ms"), "must exceed heartbeat-interval"},
		{"bad peer", append(base, "--cluster-key-file", key, "--model", "m", "--start-now", "--peers", "nohostport"), "want host:port"},
		{"stray arg", append(base, "extra"), "unexpected arguments"},
		{"bad inventory", append(base, "--cluster-key-file", key, "--model", "m", "--start-now", "--inventory-override", filepath.Join(dir, "none.yaml")), "inventory override"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			var out, errb bytes.Buffer
			err := RunNode(ctx, tc.args, &out, &errb)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err %v, want %q", err, tc.wantErr)
			}
		})
	}
}

func TestRunStatusNoDaemon(t *testing.T) {
	dir := t.TempDir()
	var out, errb bytes.Buffer
	err := RunStatus(context.Background(), []string{"--state-dir", dir}, &out, &errb)
	if err == nil || !strings.Contains(err.Error(), "no daemon for state dir") {
		t.Fatalf("err %v", err)
	}
	// A socket file left by a killed daemon.
	os.WriteFile(filepath.Join(dir, controlSockName), nil, 0o600)
	err = RunStatus(context.Background(), []string{"--state-dir", dir}, &out, &errb)
	if err == nil || !strings.Contains(err.Error(), "not running") {
		t.Fatalf("stale socket: err %v", err)
	}
}

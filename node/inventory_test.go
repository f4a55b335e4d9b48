package node

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unsafe"
)

func writeFile(t *testing.T, path, body string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestReadNUMANodes(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "node1/cpulist"), "56-111,168-223\n")
	writeFile(t, filepath.Join(dir, "node1/meminfo"), "Node 1 MemTotal:       1056768000 kB\nNode 1 MemFree: 1 kB\n")
	writeFile(t, filepath.Join(dir, "node0/cpulist"), "0-55,112-167\n")
	writeFile(t, filepath.Join(dir, "node0/meminfo"), "Node 0 MemTotal:       1056000000 kB\n")
	writeFile(t, filepath.Join(dir, "possible"), "0-1\n")
	os.MkdirAll(filepath.Join(dir, "nodeX"), 0o755)
	got := readNUMANodes(dir)
	want := []NUMANode{{0, "0-55,112-167", 1056000000 * 1024}, {1, "56-111,168-223", 1056768000 * 1024}}
	if len(got) != len(want) {
		t.Fatalf("got %+v", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("node %d: got %+v want %+v", i, got[i], want[i])
		}
	}
	if readNUMANodes(filepath.Join(dir, "missing")) != nil {
		t.Error("missing dir gave nodes")
	}
}

func TestRDMASysfs(t *testing.T) {
	tests := []struct {
		state, rate string
		wantState   string
		wantRate    float64
	}{
		{"4: ACTIVE", "400 Gb/sec (4X NDR)", "ACTIVE", 400},
		{"1: DOWN", "10 Gb/sec (4X SDR)", "DOWN", 10},
		{"ACTIVE", "", "ACTIVE", 0},
		{"", "garbage", "", 0},
		{"4: ACTIVE", "2.5 Gb/sec (1X SDR)", "ACTIVE", 2.5},
	}
	for _, tc := range tests {
		if got := parsePortState(tc.state); got != tc.wantState {
			t.Errorf("state %q: got %q want %q", tc.state, got, tc.wantState)
		}
		if got := parsePortRate(tc.rate); got != tc.wantRate {
			t.Errorf("rate %q: got %v want %v", tc.rate, got, tc.wantRate)
		}
	}
	dir := t.TempDir()
	for _, d := range []struct{ dev, port, state, rate, ll string }{
		{"mlx5_1", "1", "4: ACTIVE", "400 Gb/sec (4X NDR)", "InfiniBand"},
		{"mlx5_0", "1", "1: DOWN", "200 Gb/sec (2X HDR)", "Ethernet"},
	} {
		p := filepath.Join(dir, d.dev, "ports", d.port)
		writeFile(t, filepath.Join(p, "state"), d.state+"\n")
		writeFile(t, filepath.Join(p, "rate"), d.rate+"\n")
		writeFile(t, filepath.Join(p, "link_layer"), d.ll+"\n")
	}
	got := detectRDMA(dir)
	if len(got) != 2 || got[0].Device != "mlx5_0" || got[0].State != "DOWN" || got[1].RateGbps != 400 || got[1].LinkType != "InfiniBand" {
		t.Fatalf("got %+v", got)
	}
}

func TestNVMLStructLayout(t *testing.T) {
	// nvmlPciInfo_t is 16 + 5*4 + 32 bytes; nvmlMemory_t three u64.
	if s := unsafe.Sizeof(nvmlPCIInfo{}); s != 68 {
		t.Errorf("nvmlPCIInfo is %d bytes, C has 68", s)
	}
	if s := unsafe.Sizeof(nvmlMemory{}); s != 24 {
		t.Errorf("nvmlMemory is %d bytes, C has 24", s)
	}
	if got := cString([]byte("NVIDIA H100\x00junk")); got != "NVIDIA H100" {
		t.Errorf("cString: %q", got)
	}
}

func TestDetectWithoutNVML(t *testing.T) {
	src := InventorySource{SysRoot: t.TempDir(), NVMLPath: filepath.Join(t.TempDir(), "libnvidia-ml.so.1")}
	inv, err := src.Detect(context.Background())
	if err != nil {
		t.Fatalf("a host without NVML must not be an error: %v", err)
	}
	if inv.Hostname == "" || inv.CPUThreads == 0 || inv.MemoryBytes == 0 {
		t.Errorf("incomplete inventory: %+v", inv)
	}
	if len(inv.GPUs) != 0 || !strings.Contains(strings.Join(inv.Notes, ";"), "NVML") {
		t.Errorf("gpus %v notes %v", inv.GPUs, inv.Notes)
	}
}

func TestLoadInventory(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name, body, wantErr string
	}{
		{"yaml", "hostname: h1\ncpu_cores: 8\ngpus:\n  - {index: 0, name: H100, memory_bytes: 80}\n", ""},
		{"json", `{"hostname":"h2","memory_bytes":5,"rdma":[{"rdma_device":"mlx5_0","port":1,"state":"ACTIVE","rate_gbps":400}]}`, ""},
		{"no hostname", "cpu_cores: 8\n", "hostname is required"},
		{"unknown field", "hostname: h\ngpu_count: 4\n", "gpu_count"},
		{"gpu without memory", "hostname: h\ngpus:\n  - {index: 0, name: H100}\n", "no memory_bytes"},
		{"not yaml", "{{{", "inventory override"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, tc.name)
			writeFile(t, p, tc.body)
			inv, err := LoadInventory(p)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if inv.Source != p || inv.Hostname == "" {
				t.Errorf("inv %+v", inv)
			}
		})
	}
	if _, err := LoadInventory(filepath.Join(dir, "absent")); err == nil {
		t.Error("missing file accepted")
	}
}

func TestRunInventory(t *testing.T) {
	dir := t.TempDir()
	path := writeInventory(t, dir, "gpu-a")
	var out, errb bytes.Buffer
	if err := RunInventory(context.Background(), []string{"--json", "--inventory-override", path}, &out, &errb); err != nil {
		t.Fatal(err)
	}
	var inv HostInventory
	if err := json.Unmarshal(out.Bytes(), &inv); err != nil {
		t.Fatal(err)
	}
	if inv.Hostname != "gpu-a" || len(inv.GPUs) != 2 || inv.GPUs[1].PCIBusID != "00000000:2A:00.0" {
		t.Fatalf("json round trip: %+v", inv)
	}
	out.Reset()
	if err := RunInventory(context.Background(), []string{"--inventory-override", path}, &out, &errb); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"gpu-a", "NVIDIA H100 80GB HBM3", "80.0 GiB", "nvlink 18"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, out.String())
		}
	}
	// Detection on this machine must work too (CPU-only is fine).
	out.Reset()
	if err := RunInventory(context.Background(), []string{"--json"}, &out, &errb); err != nil {
		t.Fatal(err)
	}
}

package topology

import (
	"strings"
	"testing"
)

func TestParseInventory(t *testing.T) {
	good := `
hosts:
  - name: a
    address: 10.0.0.1
    gpu: H200
    gpus: 4
    interconnect: nvlink
    nics:
      - {name: ib0, rdma: true, gbps: 400}
      - {name: eth0, rdma: false, gbps: 100}
  - name: b
    gpu: h100-80g
    gpus: 4
    gpu_memory: 79.6GiB
    interconnect: pcie
`
	inv, err := ParseInventory([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if len(inv.Hosts) != 2 || inv.Hosts[0].NICs[0].Gbps != 400 || !inv.Hosts[0].NICs[0].RDMA {
		t.Fatalf("parsed %+v", inv)
	}
	if got := inv.Hosts[1].GPUMemory.GiB(); got < 79.59 || got > 79.61 {
		t.Errorf("gpu_memory = %g GiB, want 79.6", got)
	}
	hw, err := resolveHosts(inv, nil)
	if err != nil {
		t.Fatal(err)
	}
	if hw[0].nic.Name != "ib0" || !hw[0].nvlink || hw[1].nvlink || hw[1].gpu.Name != "H100-SXM-80G" {
		t.Errorf("resolved %+v / %+v", hw[0], hw[1])
	}
	if hw[0].memory != 150109880320 {
		t.Errorf("H200 default memory = %d", hw[0].memory)
	}

	bad := []struct{ name, doc, want string }{
		{"unknown host field", "hosts:\n- {name: a, gpu: H200, gpus: 4, gpu_count: 4}\n", "known host fields"},
		{"unknown nic field", "hosts:\n- {name: a, gpu: H200, gpus: 4, nics: [{name: x, gbps: 1, speed: 3}]}\n", "nic fields"},
		{"unknown gpu", "hosts:\n- {name: a, gpu: RTX4090, gpus: 4}\n", "known: H100-SXM-80G"},
		{"bad interconnect", "hosts:\n- {name: a, gpu: H200, gpus: 4, interconnect: infiniband}\n", "nvlink, pcie"},
		{"zero gpus", "hosts:\n- {name: a, gpu: H200, gpus: 0}\n", "gpus must be"},
		{"duplicate", "hosts:\n- {name: a, gpu: H200, gpus: 4}\n- {name: a, gpu: H200, gpus: 4}\n", "duplicate"},
		{"no name", "hosts:\n- {gpu: H200, gpus: 4}\n", "name is required"},
		{"bad memory unit", "hosts:\n- {name: a, gpu: H200, gpus: 4, gpu_memory: 80G}\n", "unknown unit"},
		{"nic speed", "hosts:\n- {name: a, gpu: H200, gpus: 4, nics: [{name: x, gbps: 0}]}\n", "gbps"},
		{"empty", "", "empty"},
		{"no hosts", "hosts: []\n", "no hosts"},
		{"nvlink on L40S", "hosts:\n- {name: a, gpu: L40S, gpus: 4, interconnect: nvlink}\n", "no NVLink"},
	}
	for _, c := range bad {
		t.Run(c.name, func(t *testing.T) {
			inv, err := ParseInventory([]byte(c.doc))
			if err == nil {
				_, err = resolveHosts(inv, nil)
			}
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err = %v, want it to mention %q", err, c.want)
			}
		})
	}
}

func TestParseHosts(t *testing.T) {
	cases := []struct {
		in    string
		hosts int
		gpus  []int
		model []string
		err   string
	}{
		{in: "2x4xH100-80G", hosts: 2, gpus: []int{4, 4}, model: []string{"H100-SXM-80G", "H100-SXM-80G"}},
		{in: "1x4xH200,1x4xH100-80G", hosts: 2, gpus: []int{4, 4}, model: []string{"H200", "H100-SXM-80G"}},
		{in: "1x8xB200", hosts: 1, gpus: []int{8}, model: []string{"B200"}},
		{in: " 1x2xmi300x ", hosts: 1, gpus: []int{2}, model: []string{"MI300X"}},
		{in: "4xH100", err: "HOSTSxGPUSxMODEL"},
		{in: "2x4xH300", err: "unknown GPU model"},
		{in: "0x4xH200", err: "1..1024 hosts"},
		{in: "1x0xH200", err: "1..64 GPUs"},
		{in: "", err: "HOSTSxGPUSxMODEL"},
	}
	for _, c := range cases {
		t.Run(c.in, func(t *testing.T) {
			inv, err := ParseHosts(c.in)
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) {
					t.Fatalf("err = %v, want %q", err, c.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			hw, err := resolveHosts(inv, nil)
			if err != nil {
				t.Fatal(err)
			}
			if len(hw) != c.hosts {
				t.Fatalf("%d hosts, want %d", len(hw), c.hosts)
			}
			for i := range hw {
				if hw[i].host.GPUs != c.gpus[i] || hw[i].gpu.Name != c.model[i] {
					t.Errorf("host %d = %d×%s, want %d×%s", i, hw[i].host.GPUs, hw[i].gpu.Name, c.gpus[i], c.model[i])
				}
			}
		})
	}
}

func TestParseByteSize(t *testing.T) {
	cases := []struct {
		in   string
		want ByteSize
		err  bool
	}{
		{"80GB", 80e9, false},
		{"80GiB", 80 << 30, false},
		{"81559MiB", 81559 << 20, false},
		{"1024", 1024, false},
		{"1.5 TiB", 3 << 39, false},
		{"80G", 0, true},
		{"-1GB", 0, true},
		{"lots", 0, true},
	}
	for _, c := range cases {
		got, err := ParseByteSize(c.in)
		if (err != nil) != c.err || got != c.want {
			t.Errorf("ParseByteSize(%q) = %d, %v; want %d, err %v", c.in, got, err, c.want, c.err)
		}
	}
}

package nccl

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestEnv(t *testing.T) {
	nics := []NIC{
		{Device: "mlx5_0", Port: 1, Netdev: "ens1", RateGbps: 200, State: "ACTIVE"},
		{Device: "mlx5_1", Port: 1, Netdev: "ens2", RateGbps: 400, State: "ACTIVE"},
		{Device: "mlx5_2", Port: 1, Netdev: "ens3", RateGbps: 800, State: "DOWN"},
	}
	none := func(string) string { return "" }
	cases := []struct {
		name     string
		choice   NICChoice
		getenv   func(string) string
		wantSet  map[string]string
		wantKept []string
	}{
		{"fastest active port", NICChoice{NICs: nics}, none,
			map[string]string{"NCCL_IB_HCA": "=mlx5_1:1", "NCCL_SOCKET_IFNAME": "ens2"}, nil},
		{"flags override the inventory", NICChoice{NICs: nics, HCA: "=mlx5_0:1", Ifname: "eth9"}, none,
			map[string]string{"NCCL_IB_HCA": "=mlx5_0:1", "NCCL_SOCKET_IFNAME": "eth9"}, nil},
		{"the user's environment wins", NICChoice{NICs: nics}, func(k string) string {
			if k == "NCCL_SOCKET_IFNAME" {
				return "lo"
			}
			return ""
		}, map[string]string{"NCCL_IB_HCA": "=mlx5_1:1"}, []string{"NCCL_SOCKET_IFNAME=lo"}},
		{"no RDMA: sockets on the given interface", NICChoice{Ifname: "veth0"}, none,
			map[string]string{"NCCL_SOCKET_IFNAME": "veth0"}, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			set, kept := Env(tc.choice, tc.getenv)
			if !reflect.DeepEqual(set, tc.wantSet) || !reflect.DeepEqual(kept, tc.wantKept) {
				t.Fatalf("Env = %v, kept %v; want %v, kept %v", set, kept, tc.wantSet, tc.wantKept)
			}
		})
	}
}

func TestTransportTaken(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nccl.log")
	log := `h:1:2 [0] NCCL INFO NET/IB : No device found.
h:1:2 [0] NCCL INFO NET/Socket : Using [0]lo:127.0.0.1<0>
h:1:2 [0] NCCL INFO Using network Socket
h:1:2 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] via NET/Socket/0
h:1:2 [0] NCCL INFO Channel 01/0 : 0[0] -> 1[0] [send] via NET/Socket/0
`
	os.WriteFile(path, []byte(log), 0o600)
	network, via, err := TransportTaken(path)
	if err != nil || network != "Socket" || !reflect.DeepEqual(via, []string{"NET/Socket/0"}) {
		t.Fatalf("TransportTaken = %q %v %v", network, via, err)
	}
}

func TestUniqueIDBytes(t *testing.T) {
	var id UniqueID
	for i := range id {
		id[i] = byte(i)
	}
	got, err := ParseUniqueID(id.Bytes())
	if err != nil || got != id {
		t.Fatalf("round trip: %v", err)
	}
	if _, err := ParseUniqueID(make([]byte, 12)); err == nil {
		t.Fatal("a 12-byte id was accepted")
	}
}

package telemetry

import (
	"fmt"

	"github.com/Mellanox/rdmamap"
)

// RDMAWire reads an RDMA port's counters (rdmamap, sysfs): traffic that
// bypasses the kernel's TCP stack, so eBPF never sees it. port_xmit_data and
// port_rcv_data count 4-byte words; these are the whole port's, not one
// link's.
func RDMAWire(device string, port int) (*Wire, error) {
	st, err := rdmamap.GetRdmaSysfsAllStats(device, port)
	if err != nil {
		return nil, fmt.Errorf("rdma counters of %s port %d: %w", device, port, err)
	}
	w := &Wire{Source: "rdma"}
	for _, e := range st.Stats {
		switch e.Name {
		case "port_xmit_data":
			w.BytesSent = 4 * e.Value
		case "port_rcv_data":
			w.BytesRecv = 4 * e.Value
		}
	}
	for _, e := range st.HwStats {
		if e.Name == "roce_slow_restart" || e.Name == "packet_seq_err" {
			w.Retransmits += e.Value
		}
	}
	return w, nil
}

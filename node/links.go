package node

import (
	"fmt"
	"io"
	"sort"
	"text/tabwriter"
)

// LinkStatus is one data-plane link of this host's pipeline stage, as its
// transport counted it (transport/telemetry's Snapshot, copied here so that
// node does not depend on the transport).
type LinkStatus struct {
	Link      string  `json:"link"` // "tcp", "nccl", "inproc"
	Peer      string  `json:"peer"`
	BytesSent uint64  `json:"bytes_sent"`
	BytesRecv uint64  `json:"bytes_recv"`
	MsgsSent  uint64  `json:"messages_sent"`
	MsgsRecv  uint64  `json:"messages_recv"`
	SendP50us float64 `json:"send_p50_us"`
	SendP99us float64 `json:"send_p99_us"`
	RecvP50us float64 `json:"recv_p50_us"`
	RecvP99us float64 `json:"recv_p99_us"`
	// Wire bytes and retransmits as the kernel or the NIC counted them;
	// WireSource is "" where no such counter was readable.
	WireSource    string `json:"wire_source,omitempty"`
	WireBytesSent uint64 `json:"wire_bytes_sent,omitempty"`
	WireBytesRecv uint64 `json:"wire_bytes_recv,omitempty"`
	Retransmits   uint64 `json:"retransmits,omitempty"`
}

// writeLinks prints the links' traffic under the members' table.
func writeLinks(w io.Writer, links []LinkStatus) error {
	if len(links) == 0 {
		return nil
	}
	links = append([]LinkStatus(nil), links...)
	sort.Slice(links, func(i, j int) bool {
		if links[i].Peer != links[j].Peer {
			return links[i].Peer < links[j].Peer
		}
		return links[i].Link < links[j].Link
	})
	fmt.Fprintln(w, "\ndata-plane links:")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LINK\tPEER\tSENT\tMSGS\tSEND P50/P99\tRECEIVED\tMSGS\tRECV P50/P99\tWIRE")
	for _, l := range links {
		wire := "-"
		if l.WireSource != "" {
			wire = fmt.Sprintf("%s: %s out, %s in, %d retransmits", l.WireSource,
				trafficBytes(l.WireBytesSent), trafficBytes(l.WireBytesRecv), l.Retransmits)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%.0f/%.0f µs\t%s\t%d\t%.0f/%.0f µs\t%s\n", l.Link, l.Peer,
			trafficBytes(l.BytesSent), l.MsgsSent, l.SendP50us, l.SendP99us,
			trafficBytes(l.BytesRecv), l.MsgsRecv, l.RecvP50us, l.RecvP99us, wire)
	}
	return tw.Flush()
}

// trafficBytes prints a byte count with a binary unit and one decimal.
func trafficBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	v, suffix := float64(n)/unit, "KiB"
	for _, s := range []string{"MiB", "GiB", "TiB"} {
		if v < unit {
			break
		}
		v, suffix = v/unit, s
	}
	return fmt.Sprintf("%.1f %s", v, suffix)
}

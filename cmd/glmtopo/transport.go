package main

import (
	"context"
	"io"

	transportbench "github.com/glmtopo/glmtopo/bench/transport"
	"github.com/glmtopo/glmtopo/node"
	"github.com/glmtopo/glmtopo/transport/nccl"
)

// runBenchTransport wires the transport benchmark to the daemons' cluster
// key reader and the host inventory's RDMA ports.
func runBenchTransport(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return transportbench.Run(ctx, args, stdout, stderr, transportbench.Hooks{
		LoadKey: func(path string) ([]byte, error) {
			k, err := node.LoadClusterKey(path)
			return []byte(k), err
		},
		NICs: func(ctx context.Context) []nccl.NIC {
			inv, err := node.InventorySource{}.Detect(ctx)
			if err != nil {
				return nil
			}
			nics := make([]nccl.NIC, 0, len(inv.RDMA))
			for _, r := range inv.RDMA {
				nics = append(nics, nccl.NIC{Device: r.Device, Port: r.Port, Netdev: r.Netdev, RateGbps: r.RateGbps, State: r.State})
			}
			return nics
		},
	})
}

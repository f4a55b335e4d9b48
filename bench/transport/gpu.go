package transportbench

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/transport"
	"github.com/glmtopo/glmtopo/transport/cudastage"
	"github.com/glmtopo/glmtopo/transport/nccl"
	"github.com/glmtopo/glmtopo/transport/tcp"
)

// stagingChunk is each page-locked slot of the pinned TCP link.
const stagingChunk = 4 << 20

// gpuLink is a link measured besides TCP, with device buffers of each size.
type gpuLink struct {
	name       string
	link       transport.Link
	send, recv func(size int64) transport.Buffer
}

// gpuEnd is one endpoint's device, staging and buffers.
type gpuEnd struct {
	dev              *cuda.Device
	sendSt, recvSt   *cudastage.Stager
	sendBuf, recvBuf uintptr
	maxSize          int64
	ncclLog          string
	links            []gpuLink
	closers          []func() error
}

func (g *gpuEnd) Close() error {
	if g == nil {
		return nil
	}
	for i := len(g.closers) - 1; i >= 0; i-- {
		g.closers[i]()
	}
	return nil
}

// openGPU opens the device, two stagers and a send and a receive buffer of
// the largest size; nil (no error) when there is no GPU and mode is auto.
func openGPU(o Options) (*gpuEnd, error) {
	if o.NCCL == "off" {
		return nil, nil
	}
	dev, err := cuda.OpenDevice(o.Device)
	if err != nil {
		if o.NCCL == "auto" && errors.Is(err, cuda.ErrNoCUDA) {
			o.Logger.Info("bench transport: no GPU, TCP only", "reason", err)
			return nil, nil
		}
		return nil, err
	}
	g := &gpuEnd{dev: dev, closers: []func() error{dev.Close}}
	for _, s := range o.Sizes {
		g.maxSize = max(g.maxSize, s)
	}
	fail := func(err error) (*gpuEnd, error) { g.Close(); return nil, err }
	if g.sendSt, err = cudastage.New(dev, stagingChunk); err != nil {
		return fail(err)
	}
	g.closers = append(g.closers, g.sendSt.Close)
	if g.recvSt, err = cudastage.New(dev, stagingChunk); err != nil {
		return fail(err)
	}
	g.closers = append(g.closers, g.recvSt.Close)
	for _, p := range []*uintptr{&g.sendBuf, &g.recvBuf} {
		if *p, err = dev.Alloc(g.maxSize); err != nil {
			return fail(err)
		}
		ptr := *p
		g.closers = append(g.closers, func() error { return dev.Free(ptr) })
	}
	// Before the first NCCL call: NCCL reads its environment once.
	if err := nccl.ApplyEnv(o.NIC, o.Logger); err != nil {
		return fail(err)
	}
	g.ncclLog = nccl.EnableTransportLog(os.TempDir())
	return g, nil
}

func (g *gpuEnd) sendFn(size int64) transport.Buffer {
	return transport.Buffer{Dev: g.sendBuf, Bytes: size}
}
func (g *gpuEnd) recvFn(int64) transport.Buffer {
	return transport.Buffer{Dev: g.recvBuf, Bytes: g.maxSize}
}

// withStagers adds g's stagers to a link configuration.
func (g *gpuEnd) withStagers(c tcp.Config) tcp.Config {
	if g != nil {
		c.Stager, c.RecvStager = g.sendSt, g.recvSt
	}
	return c
}

// dialGPU opens the client's GPU links: TCP with pinned staging, and NCCL
// (rank 1; the server is rank 0 and creates the id) unless in one process.
func dialGPU(ctx context.Context, o Options, g *gpuEnd, addr string, withNCCL bool) error {
	if g == nil {
		return nil
	}
	pl, err := tcp.Dial(ctx, addr, g.withStagers(linkConfig(o, "bench-client-pinned")))
	if err != nil {
		return err
	}
	g.closers = append(g.closers, pl.Close)
	if err := pl.Send(ctx, hello("tcp-pinned")); err != nil {
		return err
	}
	g.links = append(g.links, gpuLink{name: "tcp-pinned", link: pl, send: g.sendFn, recv: g.recvFn})
	if !withNCCL {
		o.Logger.Info("bench transport: NCCL needs two processes (two ranks); run --listen and --peer (scripts/gpu-transport.sh)")
		return nil
	}
	if _, err := nccl.Version(); err != nil {
		if o.NCCL == "auto" {
			o.Logger.Info("bench transport: no NCCL", "reason", err)
			return nil
		}
		return err
	}
	ctl, err := tcp.Dial(ctx, addr, linkConfig(o, "bench-client-nccl"))
	if err != nil {
		return err
	}
	g.closers = append(g.closers, ctl.Close)
	if err := ctl.Send(ctx, hello("nccl")); err != nil {
		return err
	}
	nl, err := ncclLink(ctx, o, g, ctl, false)
	if err != nil {
		return err
	}
	g.links = append(g.links, gpuLink{name: "nccl", link: nl, send: g.sendFn, recv: g.recvFn})
	return nil
}

// ncclLink forms the two-rank communicator over ctl and logs which NCCL
// transport it took.
func ncclLink(ctx context.Context, o Options, g *gpuEnd, ctl transport.Link, root bool) (*nccl.Link, error) {
	id, err := nccl.ExchangeID(ctx, ctl, root)
	if err != nil {
		return nil, fmt.Errorf("nccl unique id: %w", err)
	}
	rank, peer := 1, 0
	if root {
		rank, peer = 0, 1
	}
	comm, err := nccl.InitRank(ctx, g.dev, id, 2, rank)
	if err != nil {
		return nil, err
	}
	g.closers = append(g.closers, comm.Close)
	nl, err := nccl.NewLink(ctl, comm, g.dev, peer, transport.DefaultLimits())
	if err != nil {
		return nil, err
	}
	g.closers = append(g.closers, nl.Close)
	if network, via, err := nccl.TransportTaken(nccl.LogPath(g.ncclLog)); err == nil {
		o.Logger.Info("nccl transport taken", "network", network, "channels", via, "rank", rank)
	}
	return nl, nil
}

// serveGPU serves a GPU link kind on the server.
func serveGPU(ctx context.Context, o Options, g *gpuEnd, l *tcp.Link, kind string) error {
	if g == nil {
		return fmt.Errorf("bench: the client asked for a %q link but this end has no GPU (--nccl=off or none found)", kind)
	}
	switch kind {
	case "tcp-pinned":
		return serveLink(ctx, l, g.recvFn)
	case "nccl":
		nl, err := ncclLink(ctx, o, g, l, true)
		if err != nil {
			return err
		}
		return serveLink(ctx, nl, g.recvFn)
	}
	return fmt.Errorf("bench: unknown link kind %q", kind)
}

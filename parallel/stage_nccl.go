package parallel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/transport"
	"github.com/glmtopo/glmtopo/transport/nccl"
)

// ncclBackend is what NCCL hops need of a backend (kernels/cuda.Backend):
// device rows, and the device whose primary context NCCL shares with it.
type ncclBackend interface {
	rowDevice
	Ordinal() int
}

var _ ncclBackend = (*cuda.Backend)(nil)

// ncclHops makes a process's ring hops NCCL links: a two-rank communicator
// per hop, its unique id sent over the hop's TCP link, which keeps
// carrying the headers (nccl.Link).
type ncclHops struct {
	be      ncclBackend
	dev     *cuda.Device
	logFile string // NCCL's INIT/NET log, to tell which transport it took ("": the user's NCCL_DEBUG)

	mu    sync.Mutex
	links []*nccl.Link
	comms []*nccl.Comm
}

// openNCCLHops is the devHopsFunc of CUDA backends with libnccl.
func openNCCLHops(be kernels.Backend) (devHops, error) {
	cb, ok := be.(ncclBackend)
	if !ok {
		return nil, fmt.Errorf("the %s backend has no device memory for NCCL", be.Name())
	}
	// Before NCCL reads its environment (its first init): NCCL falls back
	// from IB to sockets silently, and only its log says which it took.
	pattern := nccl.EnableTransportLog(os.TempDir())
	if _, err := nccl.Version(); err != nil {
		return nil, err
	}
	dev, err := cuda.OpenDevice(cb.Ordinal())
	if err != nil {
		return nil, err
	}
	h := &ncclHops{be: cb, dev: dev}
	if pattern != "" {
		h.logFile = nccl.LogPath(pattern)
	}
	return h, nil
}

func (h *ncclHops) device() rowDevice { return h.be }

// hop forms the hop's communicator: the sending end is rank 0 and makes
// the id. nccl.InitRank aborts at ctx's deadline, so a neighbour that
// never comes fails the setup instead of blocking it.
func (h *ncclHops) hop(ctx context.Context, ctl transport.Link, send bool) (transport.Link, error) {
	id, err := nccl.ExchangeID(ctx, ctl, send)
	if err != nil {
		return nil, fmt.Errorf("nccl unique id with %s: %w", ctl.Peer(), err)
	}
	rank, peer := 1, 0
	if send {
		rank, peer = 0, 1
	}
	comm, err := nccl.InitRank(ctx, h.dev, id, 2, rank)
	if err != nil {
		return nil, fmt.Errorf("nccl communicator with %s: %w", ctl.Peer(), err)
	}
	l, err := nccl.NewLink(ctl, comm, h.dev, peer, transport.DefaultLimits())
	if err != nil {
		comm.Close()
		return nil, err
	}
	h.mu.Lock()
	h.links, h.comms = append(h.links, l), append(h.comms, comm)
	h.mu.Unlock()
	h.logTransport("nccl hop formed", ctl.Peer(), send)
	return &ncclHop{Link: l, ctl: ctl}, nil
}

// logTransport logs the network NCCL chose and the channels it has
// connected (point-to-point channels connect at the first transfer, so
// close logs them again).
func (h *ncclHops) logTransport(msg, peer string, send bool) {
	if h.logFile == "" {
		return
	}
	network, via, err := nccl.TransportTaken(h.logFile)
	if err != nil {
		slog.Debug("nccl transport log unreadable", "file", h.logFile, "err", err)
		return
	}
	slog.Info(msg, "peer", peer, "sends", send, "network", network, "channels", via)
}

// close frees every hop's stream and communicator, then the device; the
// links' users have stopped.
func (h *ncclHops) close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.dev == nil {
		return nil
	}
	h.logTransport("nccl transport taken", "", false)
	var err error
	for _, l := range h.links {
		err = errors.Join(err, l.Close())
	}
	for _, c := range h.comms {
		err = errors.Join(err, c.Close())
	}
	err = errors.Join(err, h.dev.Close())
	h.links, h.comms, h.dev = nil, nil, nil
	return err
}

// ncclHop is a hop's link as the ring holds it: Close closes the TCP link
// under it, which ends a wait for a header. A transfer in progress ends
// with its context (nccl.Comm.Wait aborts the communicator then, on the
// waiting goroutine: an abort from another one would free the
// communicator under it); the stream and the communicator are freed by
// ncclHops.close once nothing uses them.
type ncclHop struct {
	*nccl.Link
	ctl transport.Link
}

func (l *ncclHop) Close() error { return l.ctl.Close() }

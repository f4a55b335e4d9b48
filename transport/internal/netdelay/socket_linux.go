//go:build linux

package netdelay

import (
	"fmt"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// queue is a non-blocking NETLINK_NETFILTER socket for one queue number and
// an eventfd that interrupts its waits (Run's context).
type queue struct {
	fd, wake int
	num      uint16
	seq      uint32
	buf      []byte

	mu     sync.Mutex // wakeUp (another goroutine) against close
	closed bool
}

func openQueue(num uint16) (*queue, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, netlinkNetfilter)
	if err != nil {
		return nil, fmt.Errorf("netdelay: netlink socket: %w", err)
	}
	// A large receive buffer so that a full kernel queue's messages fit:
	// a message the socket has no room for is lost (ENOBUFS). FORCE needs
	// CAP_NET_ADMIN, which binding a queue needs anyway.
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, rcvBuf) != nil {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, rcvBuf)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netdelay: bind netlink socket: %w", err)
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netdelay: eventfd: %w", err)
	}
	return &queue{fd: fd, wake: wake, num: num, buf: make([]byte, 64<<10)}, nil
}

func (q *queue) close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.closed = true
	unix.Close(q.fd)
	unix.Close(q.wake)
}

func (q *queue) nextSeq() uint32 {
	q.seq++
	if q.seq == 0 { // 0 marks verdicts, whose errors are not waited for
		q.seq++
	}
	return q.seq
}

// wakeUp makes the current or next wait return at once.
func (q *queue) wakeUp() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed { // the fd number may belong to something else by now
		return
	}
	var one [8]byte
	one[0] = 1 // eventfd counters are host-endian; any nonzero value wakes
	_, _ = unix.Write(q.wake, one[:])
}

func (q *queue) send(b []byte) error {
	if err := unix.Sendto(q.fd, b, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("netlink send: %w", err)
	}
	return nil
}

// recv reads one datagram; unix.EAGAIN when there is none.
func (q *queue) recv() ([]byte, error) {
	n, _, err := unix.Recvfrom(q.fd, q.buf, 0)
	if err != nil {
		return nil, err
	}
	return q.buf[:n], nil
}

// clearWake undoes wakeUp, so that waits block again (shutdown's unbind).
func (q *queue) clearWake() {
	var b [8]byte
	_, _ = unix.Read(q.wake, b[:])
}

// wait blocks until the socket is readable, the deadline until passes, or
// wakeUp was called. It reports whether the socket is readable.
func (q *queue) wait(until time.Time) (bool, error) {
	fds := []unix.PollFd{{Fd: int32(q.fd), Events: unix.POLLIN}, {Fd: int32(q.wake), Events: unix.POLLIN}}
	ts := unix.NsecToTimespec(max(time.Until(until), 0).Nanoseconds())
	_, err := unix.Ppoll(fds, &ts, nil)
	switch {
	case err == unix.EINTR:
		return false, nil
	case err != nil:
		return false, fmt.Errorf("netdelay: ppoll: %w", err)
	}
	return fds[0].Revents&(unix.POLLIN|unix.POLLERR) != 0, nil
}

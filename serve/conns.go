package serve

import (
	"container/list"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"
)

// Connection bounds. A client that sends its headers or body slowly holds a
// file descriptor; thousands of them used to exhaust the process's file
// limit, after which nobody could connect. Reads are bounded in time, idle
// keep-alive connections are closed, and the number of connections is
// capped below the file limit.
const (
	headerTimeout = 10 * time.Second // request line and headers
	bodyTimeout   = 30 * time.Second // the whole request body
	idleTimeout   = 30 * time.Second // between keep-alive requests
	// fdReserve is the file limit's share kept for everything that is not a
	// client connection: checkpoint shards, the driver, logs, the listener.
	fdReserve = 256
	// refuseWriteTimeout bounds the one write a refused connection gets.
	refuseWriteTimeout = 50 * time.Millisecond
)

// defaultMaxConnections is the soft file limit less fdReserve.
func defaultMaxConnections() int {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil || rl.Cur == 0 {
		return 4096
	}
	return max(64, int(min(rl.Cur, 1<<20))-fdReserve)
}

// connLimiter is a listener that holds at most max connections. At the cap
// a new connection evicts the connection that has been stalled longest in
// reading a request or idle between requests (closing it loses no work);
// when every connection is busy computing a response, the new one gets a
// canned 503 and is closed at once, costing no goroutine. Evictable
// connections sit in a list, least recently active first, so accepting at
// the cap costs O(1) however many connections are held.
type connLimiter struct {
	net.Listener
	max     int
	onEvent func(kind string) // "evicted" or "refused"

	mu        sync.Mutex
	conns     map[net.Conn]*list.Element // nil element: busy
	evictable list.List                  // of net.Conn, oldest activity first
}

func newConnLimiter(ln net.Listener, max int, onEvent func(string)) *connLimiter {
	return &connLimiter{Listener: ln, max: max, onEvent: onEvent, conns: map[net.Conn]*list.Element{}}
}

func (l *connLimiter) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.admit(c) {
			return c, nil
		}
		refuse(c)
		l.onEvent("refused")
	}
}

// admit tracks c, evicting a stalled connection if the cap is reached.
func (l *connLimiter) admit(c net.Conn) bool {
	l.mu.Lock()
	var victim net.Conn
	if len(l.conns) >= l.max {
		front := l.evictable.Front()
		if front == nil {
			l.mu.Unlock()
			return false
		}
		victim = l.evictable.Remove(front).(net.Conn)
		delete(l.conns, victim)
	}
	l.conns[c] = l.evictable.PushBack(c)
	l.mu.Unlock()
	if victim != nil {
		victim.Close()
		l.onEvent("evicted")
	}
	return true
}

// refuse answers a connection over the cap with a 503 and closes it.
func refuse(c net.Conn) {
	_ = c.SetWriteDeadline(time.Now().Add(refuseWriteTimeout))
	const msg = "the server has too many connections; retry later\n"
	_, _ = io.WriteString(c, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nRetry-After: 1\r\n"+
		"Connection: close\r\nContent-Length: 49\r\n\r\n"+msg)
	_ = c.Close()
}

// connState follows http.Server's view of each connection.
func (l *connLimiter) connState(c net.Conn, st http.ConnState) {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch st {
	case http.StateNew, http.StateActive, http.StateIdle:
		// Active: the headers are in, the handler starts by reading the body.
		if e, ok := l.conns[c]; ok {
			if e != nil {
				l.evictable.MoveToBack(e)
			} else {
				l.conns[c] = l.evictable.PushBack(c)
			}
		}
	case http.StateClosed, http.StateHijacked:
		if e, ok := l.conns[c]; ok {
			if e != nil {
				l.evictable.Remove(e)
			}
			delete(l.conns, c)
		}
	}
}

// markBusy makes a connection unevictable: its request is read and its
// response is being computed.
func (l *connLimiter) markBusy(c net.Conn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e, ok := l.conns[c]; ok && e != nil {
		l.evictable.Remove(e)
		l.conns[c] = nil
	}
}

// count is the number of connections held.
func (l *connLimiter) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.conns)
}

type connKey struct{}

// connHandle is what a request's context knows of its connection.
type connHandle struct {
	conn        net.Conn
	lim         *connLimiter
	bodyTimeout time.Duration
}

// markRequestRead tells the limiter that the request on ctx's connection is
// read; a no-op outside Serve (httptest servers, tests).
func markRequestRead(ctx context.Context) {
	if h, ok := ctx.Value(connKey{}).(connHandle); ok {
		h.lim.markBusy(h.conn)
	}
}

// eventLog aggregates a repeated event into one log line per interval:
// the first occurrence is logged at once, later ones are counted and
// reported with the next line, so a burst of 855 refusals is one line.
type eventLog struct {
	log      *slog.Logger
	level    slog.Level
	msg      string
	interval time.Duration
	now      func() time.Time

	mu      sync.Mutex
	last    time.Time
	pending map[string]int
}

func newEventLog(log *slog.Logger, level slog.Level, msg string, interval time.Duration) *eventLog {
	return &eventLog{log: log, level: level, msg: msg, interval: interval, now: time.Now, pending: map[string]int{}}
}

// add counts one event of kind and logs the counts when the interval is up.
func (e *eventLog) add(kind string) {
	e.mu.Lock()
	e.pending[kind]++
	now := e.now()
	if !e.last.IsZero() && now.Sub(e.last) < e.interval {
		e.mu.Unlock()
		return
	}
	e.last = now
	counts := e.pending
	e.pending = map[string]int{}
	e.mu.Unlock()
	attrs := make([]any, 0, 2*len(counts)+2)
	for k, n := range counts {
		attrs = append(attrs, k, n)
	}
	attrs = append(attrs, "window", e.interval.String())
	e.log.Log(context.Background(), e.level, e.msg, attrs...)
}

package node

import (
	"sync"
	"time"
)

// peerLogInterval is how often one peer's repeated failure is logged at
// info level; the repeats in between go to debug and are counted.
const peerLogInterval = time.Minute

// logLimiter lets one message per key through per interval and counts the
// ones it held back, so a peer that stays unreachable is reported at once
// and then once a minute, not on every retry.
type logLimiter struct {
	every time.Duration
	now   func() time.Time

	mu         sync.Mutex
	last       map[string]time.Time
	suppressed map[string]int
}

func newLogLimiter(every time.Duration, now func() time.Time) *logLimiter {
	return &logLimiter{every: every, now: now, last: map[string]time.Time{}, suppressed: map[string]int{}}
}

// allow reports whether a message for key may be logged now and, if so,
// how many were held back since the last one.
func (l *logLimiter) allow(key string) (ok bool, suppressed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	if last, seen := l.last[key]; seen && now.Sub(last) < l.every {
		l.suppressed[key]++
		return false, 0
	}
	l.last[key] = now
	n := l.suppressed[key]
	delete(l.suppressed, key)
	return true, n
}

// reset forgets key: after a success the next failure is news again.
func (l *logLimiter) reset(key string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.last, key)
	delete(l.suppressed, key)
}

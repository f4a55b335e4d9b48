package netdelay

import (
	"errors"
	"fmt"
	"time"
)

// Line is the delay line's schedule: a bounded FIFO of packet ids, each due
// delay (± jitter) after it arrived. Order is kept like a wire keeps it: a
// packet is never due before the one ahead of it (jitter only stretches
// gaps), so Release hands out a prefix and one batch verdict covers it.
// Line does no I/O and reads no clock; it is not safe for concurrent use.
type Line struct {
	delay, jitter time.Duration
	rnd           func() float64 // in [0, 1)

	ring    []entry
	head, n int
	lastDue time.Time
}

type entry struct {
	id  uint32
	due time.Time
}

// ErrFull is returned by Push when capacity packets are already waiting.
var ErrFull = errors.New("netdelay: line full")

// NewLine makes a line for at most capacity waiting packets. rnd draws the
// jitter (uniform in ±jitter); it may be nil when jitter is 0.
func NewLine(delay, jitter time.Duration, capacity int, rnd func() float64) (*Line, error) {
	switch {
	case delay < 0 || jitter < 0:
		return nil, fmt.Errorf("netdelay: negative delay %v or jitter %v", delay, jitter)
	case jitter > 0 && rnd == nil:
		return nil, errors.New("netdelay: jitter without a random source")
	case capacity <= 0:
		return nil, fmt.Errorf("netdelay: capacity %d, want > 0", capacity)
	}
	return &Line{delay: delay, jitter: jitter, rnd: rnd, ring: make([]entry, capacity)}, nil
}

// Len is the number of packets waiting.
func (l *Line) Len() int { return l.n }

// Push schedules packet id, which arrived at arrived, and says when it is
// due. A full line returns ErrFull and keeps nothing.
func (l *Line) Push(id uint32, arrived time.Time) (time.Time, error) {
	if l.n == len(l.ring) {
		return time.Time{}, ErrFull
	}
	d := l.delay
	if l.jitter > 0 {
		d += time.Duration((2*l.rnd() - 1) * float64(l.jitter))
		d = max(d, 0)
	}
	due := arrived.Add(d)
	if due.Before(l.lastDue) {
		due = l.lastDue
	}
	l.lastDue = due
	l.ring[(l.head+l.n)%len(l.ring)] = entry{id: id, due: due}
	l.n++
	return due, nil
}

// Next says when the first waiting packet is due; ok is false when none
// waits.
func (l *Line) Next() (due time.Time, ok bool) {
	if l.n == 0 {
		return time.Time{}, false
	}
	return l.ring[l.head].due, true
}

// Release removes every packet due at now and returns the id of the last
// one and how many there were (0: nothing is due).
func (l *Line) Release(now time.Time) (last uint32, n int) {
	for l.n > 0 && !l.ring[l.head].due.After(now) {
		last = l.ring[l.head].id
		l.head = (l.head + 1) % len(l.ring)
		l.n--
		n++
	}
	return last, n
}

// Flush removes every waiting packet, due or not (on shutdown: they are
// let through rather than dropped).
func (l *Line) Flush() (last uint32, n int) {
	if l.n == 0 {
		return 0, 0
	}
	last = l.ring[(l.head+l.n-1)%len(l.ring)].id
	n = l.n
	l.head, l.n = 0, 0
	return last, n
}

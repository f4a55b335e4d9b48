package netdelay

import (
	"errors"
	"testing"
	"time"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func ms(f float64) time.Time { return t0.Add(time.Duration(f * float64(time.Millisecond))) }

// seq returns the values in turn: a reproducible random source.
func seq(vals ...float64) func() float64 {
	i := 0
	return func() float64 { v := vals[i%len(vals)]; i++; return v }
}

func TestLineSchedule(t *testing.T) {
	type push struct {
		id      uint32
		at      float64 // ms after t0
		wantDue float64
	}
	type release struct {
		at       float64
		wantLast uint32
		wantN    int
	}
	tests := []struct {
		name          string
		delay, jitter time.Duration
		rnd           func() float64
		pushes        []push
		releases      []release
		wantLenAtEnd  int
	}{
		{
			name: "fixed delay, in order", delay: time.Millisecond,
			pushes:       []push{{1, 0, 1}, {2, 0.2, 1.2}, {3, 0.5, 1.5}},
			releases:     []release{{0.99, 0, 0}, {1.0, 1, 1}, {1.3, 2, 1}, {5, 3, 1}},
			wantLenAtEnd: 0,
		},
		{
			name: "several due at once release as one batch", delay: time.Millisecond,
			pushes:       []push{{10, 0, 1}, {11, 0.1, 1.1}, {12, 0.2, 1.2}, {13, 3, 4}},
			releases:     []release{{1.25, 12, 3}},
			wantLenAtEnd: 1,
		},
		{
			// rnd 0 → -jitter, 1 → almost +jitter, 0.5 → 0.
			name: "jitter never reorders", delay: time.Millisecond, jitter: 500 * time.Microsecond, rnd: seq(1, 0, 0.5),
			pushes:       []push{{1, 0, 1.5}, {2, 0.1, 1.5}, {3, 0.2, 1.5}},
			releases:     []release{{1.49, 0, 0}, {1.5, 3, 3}},
			wantLenAtEnd: 0,
		},
		{
			name: "jitter larger than delay clamps at zero", jitter: time.Millisecond, rnd: seq(0),
			pushes:       []push{{1, 2, 2}},
			releases:     []release{{2, 1, 1}},
			wantLenAtEnd: 0,
		},
		{
			name: "ids wrap", delay: time.Millisecond,
			pushes:       []push{{^uint32(0), 0, 1}, {0, 0, 1}},
			releases:     []release{{1, 0, 2}},
			wantLenAtEnd: 0,
		},
	}
	for _, tt := range tests {
		l, err := NewLine(tt.delay, tt.jitter, 8, tt.rnd)
		if err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		for _, p := range tt.pushes {
			due, err := l.Push(p.id, ms(p.at))
			if err != nil || !due.Equal(ms(p.wantDue)) {
				t.Errorf("%s: push %d at %v: due %v err %v, want %v", tt.name, p.id, p.at, due.Sub(t0), err, ms(p.wantDue).Sub(t0))
			}
		}
		for _, r := range tt.releases {
			last, n := l.Release(ms(r.at))
			if last != r.wantLast || n != r.wantN {
				t.Errorf("%s: release at %v ms: last %d n %d, want %d %d", tt.name, r.at, last, n, r.wantLast, r.wantN)
			}
		}
		if l.Len() != tt.wantLenAtEnd {
			t.Errorf("%s: %d left, want %d", tt.name, l.Len(), tt.wantLenAtEnd)
		}
	}
}

func TestLineBoundedAndFlush(t *testing.T) {
	l, err := NewLine(time.Millisecond, 0, 3, nil)
	if err != nil {
		t.Fatal(err)
	}
	for round := range 3 { // the ring wraps around
		base := uint32(round * 10)
		at := func(f float64) time.Time { return ms(float64(base) + f) } // time goes on between rounds
		for i := range uint32(3) {
			if _, err := l.Push(base+i, at(float64(i))); err != nil {
				t.Fatalf("round %d push %d: %v", round, i, err)
			}
		}
		if _, err := l.Push(base+3, at(3)); !errors.Is(err, ErrFull) {
			t.Fatalf("round %d: push past capacity: err %v, want ErrFull", round, err)
		}
		if due, ok := l.Next(); !ok || !due.Equal(at(1)) {
			t.Fatalf("round %d: next %v %v, want %v", round, due.Sub(t0), ok, at(1).Sub(t0))
		}
		if last, n := l.Release(at(1)); last != base || n != 1 {
			t.Fatalf("round %d: release: %d %d", round, last, n)
		}
		if last, n := l.Flush(); last != base+2 || n != 2 {
			t.Fatalf("round %d: flush: %d %d, want %d 2", round, last, n, base+2)
		}
		if _, ok := l.Next(); ok || l.Len() != 0 {
			t.Fatalf("round %d: not empty after flush", round)
		}
		if _, n := l.Flush(); n != 0 {
			t.Fatalf("round %d: second flush released %d", round, n)
		}
	}
}

func TestNewLineRejects(t *testing.T) {
	tests := []struct {
		name          string
		delay, jitter time.Duration
		capacity      int
		rnd           func() float64
	}{
		{"negative delay", -time.Millisecond, 0, 4, nil},
		{"negative jitter", 0, -time.Millisecond, 4, seq(0)},
		{"jitter without source", time.Millisecond, time.Millisecond, 4, nil},
		{"zero capacity", time.Millisecond, 0, 0, nil},
	}
	for _, tt := range tests {
		if _, err := NewLine(tt.delay, tt.jitter, tt.capacity, tt.rnd); err == nil {
			t.Errorf("%s: no error", tt.name)
		}
	}
}

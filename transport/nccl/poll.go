package nccl

import (
	"runtime"
	"time"
)

// Waits poll (cuStreamQuery, ncclCommGetAsyncError) rather than block in
// cuStreamSynchronize, because a blocked sync cannot see a context end. A
// decode hop finishes in tens of microseconds, so a wait first spins,
// yielding to other goroutines between looks, for spinFor; only then does
// it sleep, from sleepMin doubling to sleepMax. The spin matters: a Go
// sleep shorter than a millisecond often lasts a millisecond (the netpoller
// waits in whole milliseconds when the process is otherwise idle), which is
// what made the first GPU run's 10 KB NCCL round trip take 834 µs.
const (
	spinFor    = 10 * time.Millisecond
	sleepMin   = 20 * time.Microsecond
	sleepMax   = 500 * time.Microsecond
	checkEvery = 16 // polls between looks at the async error and ctx
)

// poller paces one wait's polls.
type poller struct {
	start time.Time
	sleep time.Duration
	n     int
}

// pause waits before the next poll: a yield while the wait is young, a
// growing sleep once it is not.
func (p *poller) pause() {
	p.n++
	if p.start.IsZero() {
		p.start = time.Now()
	}
	if time.Since(p.start) < spinFor {
		runtime.Gosched()
		return
	}
	p.sleep = min(max(2*p.sleep, sleepMin), sleepMax)
	time.Sleep(p.sleep)
}

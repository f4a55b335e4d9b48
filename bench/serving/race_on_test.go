//go:build race

package serving

// raceEnabled: the race detector slows every goroutine several times over, which no 1 ms
// timing tolerance survives.
const raceEnabled = true

package nccl

import (
	"fmt"
	"testing"
	"time"
)

// BenchmarkPollLag measures how late a poller notices a transfer that ends
// after d: the lag a Wait adds on top of NCCL itself, on this machine's CPU.
func BenchmarkPollLag(b *testing.B) {
	for _, d := range []time.Duration{20 * time.Microsecond, 500 * time.Microsecond, 5 * time.Millisecond, 20 * time.Millisecond} {
		b.Run(fmt.Sprint(d), func(b *testing.B) {
			var lag time.Duration
			for range b.N {
				end := time.Now().Add(d)
				var p poller
				for time.Now().Before(end) {
					p.pause()
				}
				lag += time.Since(end)
			}
			b.ReportMetric(float64(lag.Microseconds())/float64(b.N), "lag-µs")
		})
	}
}

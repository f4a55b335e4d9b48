package topology

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"time"
)

// timeHandoff is a round trip between two goroutines over channels.
func timeHandoff() (float64, error) {
	ping, pong := make(chan struct{}), make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range ping {
			pong <- struct{}{}
		}
	}()
	t, err := timeOp(func() error {
		ping <- struct{}{}
		<-pong
		return nil
	})
	close(ping)
	<-done
	return t, err
}

// timeLoopback measures a TCP connection on 127.0.0.1: half the round trip
// of a 64-byte message, and the bandwidth of 1 MiB messages.
func timeLoopback(ctx context.Context) (lat, bw float64, err error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, 0, fmt.Errorf("loopback: %w", err)
	}
	defer l.Close()
	echoed := make(chan error, 1)
	go func() { echoed <- echo(l) }()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", l.Addr().String())
	if err != nil {
		return 0, 0, fmt.Errorf("loopback: %w", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	roundTrip := func(n int) func() error {
		buf := make([]byte, 4+n)
		binary.LittleEndian.PutUint32(buf, uint32(n))
		return func() error {
			if _, err := c.Write(buf); err != nil {
				return err
			}
			_, err := io.ReadFull(c, buf[:4])
			return err
		}
	}
	small, err := idleRoundTrip(roundTrip(64))
	if err != nil {
		return 0, 0, fmt.Errorf("loopback: %w", err)
	}
	const big = 1 << 20
	large, err := timeOp(roundTrip(big))
	if err != nil {
		return 0, 0, fmt.Errorf("loopback: %w", err)
	}
	c.Close()
	if err := <-echoed; err != nil && err != io.EOF {
		return 0, 0, fmt.Errorf("loopback echo: %w", err)
	}
	return small / 2, big / math.Max(large-small, 1e-9), nil
}

// idleRoundTrip is the median of 101 round trips each started after the
// machine idled 300 µs: a stage waits for its next message asleep, so the
// hop pays the wake-ups that back-to-back round trips skip.
func idleRoundTrip(f func() error) (float64, error) {
	ts := make([]float64, 101)
	for i := range ts {
		time.Sleep(300 * time.Microsecond)
		start := time.Now()
		if err := f(); err != nil {
			return 0, err
		}
		ts[i] = time.Since(start).Seconds()
	}
	sort.Float64s(ts)
	return ts[len(ts)/2], nil
}

// timeWake is half the round trip of 64 bytes through `cat` in a child
// process, each sent after an idle pause: a sleeping process woken by a
// message and answering. Without cat it falls back to a second goroutine,
// which wakes faster (the reported figure is then a floor).
func timeWake(ctx context.Context) (float64, error) {
	cmd := exec.CommandContext(ctx, "cat")
	in, err := cmd.StdinPipe()
	if err != nil {
		return 0, fmt.Errorf("wake: %w", err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return 0, fmt.Errorf("wake: %w", err)
	}
	if err := cmd.Start(); err != nil {
		t, err := timeHandoff()
		return t / 2, err
	}
	buf := make([]byte, 64)
	rt, err := idleRoundTrip(func() error {
		if _, err := in.Write(buf); err != nil {
			return err
		}
		_, err := io.ReadFull(out, buf)
		return err
	})
	in.Close()
	if werr := cmd.Wait(); err == nil && werr != nil {
		err = werr
	}
	if err != nil {
		return 0, fmt.Errorf("wake: %w", err)
	}
	return rt / 2, nil
}

// echo reads length-prefixed messages and answers each with 4 bytes.
func echo(l net.Listener) error {
	c, err := l.Accept()
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	var hdr [4]byte
	buf := make([]byte, 1<<20)
	for {
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return err
		}
		n := int(binary.LittleEndian.Uint32(hdr[:]))
		for n > 0 {
			k, err := c.Read(buf[:min(n, len(buf))])
			if err != nil {
				return err
			}
			n -= k
		}
		if _, err := c.Write(hdr[:]); err != nil {
			return err
		}
	}
}

// loadAverage is the 1-minute load average (0 where /proc is absent).
func loadAverage() float64 {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(data))
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

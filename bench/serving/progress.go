package serving

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

// progress draws a one-line bar on a terminal (redrawn in place) or, when the output is a file
// or pipe, a plain line every tenth of the run so logs stay readable.
type progress struct {
	w        io.Writer
	tty      bool
	total    int
	start    time.Time
	lastLine int // tenths printed so far, non-tty
}

func newProgress(w io.Writer, total int, start time.Time) *progress {
	tty := false
	if f, ok := w.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			tty = true
		}
	}
	return &progress{w: w, tty: tty, total: total, start: start}
}

func (p *progress) update(done, failed, inflight, outTokens int, now time.Time) {
	el := now.Sub(p.start).Seconds()
	rate := 0.0
	if el > 0 {
		rate = float64(outTokens) / el
	}
	if p.tty {
		const width = 30
		fill := width * done / max(p.total, 1)
		fmt.Fprintf(p.w, "\r[%s%s] %d/%d done, %d failed, %d in flight, %.1fs, %.0f tok/s ",
			strings.Repeat("#", fill), strings.Repeat(".", width-fill), done, p.total, failed, inflight, el, rate)
		return
	}
	tenth := 10 * done / max(p.total, 1)
	if tenth > p.lastLine {
		p.lastLine = tenth
		fmt.Fprintf(p.w, "progress: %d/%d done, %d failed, %d in flight, %.1fs, %.0f tok/s\n",
			done, p.total, failed, inflight, el, rate)
	}
}

func (p *progress) finish() {
	if p.tty {
		fmt.Fprintln(p.w)
	}
}

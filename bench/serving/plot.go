package serving

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
	"gonum.org/v1/plot/vg/vgsvg"
)

// WritePlot draws four panels to path (.png or .svg): CDFs of TTFT and E2EL, CDFs of TPOT and
// ITL, output tokens per second over time, and requests in flight over time.
func WritePlot(r *Result, path string) error {
	var ttft, e2el, tpot, itl []float64
	for _, o := range r.Outcomes {
		if !o.Success {
			continue
		}
		ttft = append(ttft, ms(o.TTFT))
		e2el = append(e2el, ms(o.Latency))
		if o.OutputTokens > 1 {
			tpot = append(tpot, ms((o.Latency-o.TTFT)/time.Duration(o.OutputTokens-1)))
		}
		for _, g := range o.ITL {
			itl = append(itl, ms(g))
		}
	}
	if len(ttft) == 0 {
		return fmt.Errorf("plot %s: no successful requests", path)
	}
	title := fmt.Sprintf("%s, %d requests, rate %s", r.Model, len(r.Outcomes), pyFloat(r.Config.RequestRate))
	p1, err := cdfPlot("TTFT and end-to-end latency", map[string][]float64{"TTFT": ttft, "E2EL": e2el}, []string{"TTFT", "E2EL"})
	if err != nil {
		return err
	}
	p2, err := cdfPlot("TPOT and inter-token latency", map[string][]float64{"TPOT": tpot, "ITL": itl}, []string{"TPOT", "ITL"})
	if err != nil {
		return err
	}
	bin := binWidth(r.Duration)
	tok, conc := fineTimeline(r.Outcomes, bin)
	p3, err := seriesPlot("Output tokens/s", "tokens/s", tok, bin)
	if err != nil {
		return err
	}
	p4, err := seriesPlot("Requests in flight", "requests", conc, bin)
	if err != nil {
		return err
	}
	p1.Title.Text = title + "\n" + p1.Title.Text

	const w, h = 12 * vg.Inch, 8 * vg.Inch
	var canvas vg.CanvasWriterTo
	switch strings.ToLower(filepath.Ext(path)) {
	case ".png":
		c := vgimg.New(w, h)
		canvas = vgimg.PngCanvas{Canvas: c}
	case ".svg":
		canvas = vgsvg.New(w, h)
	default:
		return fmt.Errorf("plot %s: want a .png or .svg file", path)
	}
	dc := draw.New(canvas)
	dc.SetColor(plotter.DefaultLineStyle.Color)
	plots := [][]*plot.Plot{{p1, p2}, {p3, p4}}
	tiles := draw.Tiles{Rows: 2, Cols: 2, PadX: vg.Centimeter, PadY: vg.Centimeter,
		PadTop: vg.Millimeter * 4, PadBottom: vg.Millimeter * 4, PadLeft: vg.Millimeter * 4, PadRight: vg.Millimeter * 4}
	cs := plot.Align(plots, tiles, dc)
	for i := range plots {
		for j := range plots[i] {
			plots[i][j].Draw(cs[i][j])
		}
	}
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("plot: %w", err)
	}
	if _, err := canvas.WriteTo(f); err != nil {
		f.Close()
		return fmt.Errorf("plot %s: %w", path, err)
	}
	return f.Close()
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// cdfPlot draws empirical CDFs, at most 400 points each so a million ITLs stay cheap.
func cdfPlot(title string, series map[string][]float64, order []string) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = "latency (ms, log scale)"
	p.X.Scale = plot.LogScale{}
	p.X.Tick.Marker = logTicks{}
	p.Y.Label.Text = "fraction of samples"
	p.Y.Min, p.Y.Max = 0, 1
	p.Add(plotter.NewGrid())
	p.Legend.Top, p.Legend.Left = false, false
	for i, name := range order {
		vals := slices.Clone(series[name])
		if len(vals) == 0 {
			continue
		}
		slices.Sort(vals)
		for j := range vals {
			vals[j] = max(vals[j], 0.01) // a log axis has no zero: gaps of two chunks read at once
		}
		n := len(vals)
		k := min(n, 400)
		pts := make(plotter.XYs, 0, k+1)
		pts = append(pts, plotter.XY{X: vals[0], Y: 0})
		for j := 1; j <= k; j++ {
			idx := j*n/k - 1
			pts = append(pts, plotter.XY{X: vals[idx], Y: float64(idx+1) / float64(n)})
		}
		l, err := plotter.NewLine(pts)
		if err != nil {
			return nil, fmt.Errorf("plot %s: %w", name, err)
		}
		l.Color = plotutil.Color(i)
		l.Width = vg.Points(1.5)
		p.Add(l)
		p.Legend.Add(name, l)
	}
	return p, nil
}

func seriesPlot(title, ylabel string, ys []float64, bin time.Duration) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = "time since first request (s)"
	p.Y.Label.Text = ylabel
	p.Y.Min = 0
	p.Add(plotter.NewGrid())
	pts := make(plotter.XYs, len(ys))
	for i, y := range ys {
		pts[i] = plotter.XY{X: (float64(i) + 0.5) * bin.Seconds(), Y: y}
	}
	if len(pts) == 0 {
		pts = plotter.XYs{{}}
	}
	l, err := plotter.NewLine(pts)
	if err != nil {
		return nil, fmt.Errorf("plot %s: %w", title, err)
	}
	l.Color = plotutil.Color(0)
	l.Width = vg.Points(1.5)
	p.Add(l)
	return p, nil
}

// binWidth aims for about 100 bins over the run, at least 10 ms.
func binWidth(d time.Duration) time.Duration {
	return max(d/100, 10*time.Millisecond)
}

// fineTimeline is tokens per second and mean requests in flight per bin.
func fineTimeline(outs []Outcome, bin time.Duration) (tokens, inflight []float64) {
	var t0, tEnd time.Time
	for _, o := range outs {
		if !o.Success {
			continue
		}
		if t0.IsZero() || o.Start.Before(t0) {
			t0 = o.Start
		}
		if e := o.Start.Add(o.Latency); e.After(tEnd) {
			tEnd = e
		}
	}
	n := int(tEnd.Sub(t0)/bin) + 1
	tokens, inflight = make([]float64, n), make([]float64, n)
	for _, o := range outs {
		if !o.Success {
			continue
		}
		// Spread the request's output tokens over its token chunks (a chunk may carry several).
		perChunk := float64(o.OutputTokens) / float64(max(o.Chunks, 1))
		t := o.Start.Sub(t0) + o.TTFT
		tokens[min(int(t/bin), n-1)] += perChunk
		for _, g := range o.ITL {
			t += g
			tokens[min(int(t/bin), n-1)] += perChunk
		}
		s, e := o.Start.Sub(t0), o.Start.Sub(t0)+o.Latency
		for b := int(s / bin); b < n && time.Duration(b)*bin < e; b++ {
			lo, hi := max(s, time.Duration(b)*bin), min(e, time.Duration(b+1)*bin)
			inflight[b] += float64(hi-lo) / float64(bin)
		}
	}
	for i := range tokens {
		tokens[i] /= bin.Seconds()
	}
	return tokens, inflight
}

// logTicks labels 1-2-5 steps per decade on a log axis (every integer step when the range is
// narrower than that gives, else plain linear ticks), so a 17–24 ms range still gets labels.
type logTicks struct{}

func (logTicks) Ticks(lo, hi float64) []plot.Tick {
	if lo <= 0 || hi <= lo {
		return nil
	}
	var ticks []plot.Tick
	for _, steps := range [][]float64{{1, 2, 5}, {1, 2, 3, 4, 5, 6, 7, 8, 9}} {
		ticks = ticks[:0]
		labelled := 0
		for dec := math.Pow(10, math.Floor(math.Log10(lo))); dec <= hi; dec *= 10 {
			for m := 1.0; m < 10; m++ {
				v := m * dec
				if v < lo || v > hi {
					continue
				}
				t := plot.Tick{Value: v}
				if slices.Contains(steps, m) {
					t.Label = strconv.FormatFloat(v, 'g', 4, 64)
					labelled++
				}
				ticks = append(ticks, t)
			}
		}
		if labelled >= 3 {
			return ticks
		}
	}
	// Narrower than a few steps of a decade: evenly spaced ticks read best.
	return plot.DefaultTicks{}.Ticks(lo, hi)
}

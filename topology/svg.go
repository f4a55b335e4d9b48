package topology

import (
	"fmt"
	"html"
	"io"
	"strings"
)

var stageColors = []string{"#dbeafe", "#dcfce7", "#fef3c7", "#fce7f3", "#ede9fe", "#cffafe", "#fee2e2", "#ecfccb"}

const (
	svgGPUW, svgGPUH  = 104, 196
	svgGPUGap         = 10
	svgHostPad        = 14
	svgHostHead       = 34
	svgHostFoot       = 34
	svgHostGap        = 90
	svgHostsPerRow    = 4
	svgMargin         = 20
	svgTitleH         = 74
	svgBarH           = 84
	svgLegendH        = 40
	colWeights        = "#1e3a8a"
	colKVNeeded       = "#2563eb"
	colKVPool         = "#93c5fd"
	colOverhead       = "#9ca3af"
	colUnbudgeted     = "#f3f4f6"
	colOver           = "#dc2626"
	svgFont           = `font-family="DejaVu Sans, Helvetica, Arial, sans-serif"`
	svgHostStroke     = "#374151"
	svgGPUStrokeColor = "#6b7280"
)

// WriteSVG draws hosts, GPUs (coloured by pipeline stage, with a memory bar
// each), the links inside hosts and the pipeline hops between them.
func (r *PlanResult) WriteSVG(w io.Writer) error {
	var b strings.Builder
	hosts := r.Hosts
	hostW := func(h Host) int { return 2*svgHostPad + h.GPUs*svgGPUW + (h.GPUs-1)*svgGPUGap }
	hostH := svgHostHead + svgGPUH + svgHostFoot
	rows := (len(hosts) + svgHostsPerRow - 1) / svgHostsPerRow
	type pos struct{ x, y, w int }
	places := make([]pos, len(hosts))
	width := 0
	for i, h := range hosts {
		row, col := i/svgHostsPerRow, i%svgHostsPerRow
		x := svgMargin
		if col > 0 {
			prev := places[i-1]
			x = prev.x + prev.w + svgHostGap
		}
		y := svgMargin + svgTitleH + row*(hostH+50)
		places[i] = pos{x, y, hostW(h)}
		width = max(width, x+hostW(h)+svgMargin)
	}
	width = max(width, 760)
	height := svgMargin + svgTitleH + rows*(hostH+50) + svgLegendH + svgMargin
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" %s font-size="12">`+"\n",
		width, height, width, height, svgFont)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="white"/>`+"\n", width, height)
	fmt.Fprintf(&b, `<defs><marker id="arrow" markerWidth="10" markerHeight="8" refX="9" refY="4" orient="auto"><path d="M0,0 L10,4 L0,8 z" fill="%s"/></marker></defs>`+"\n", svgHostStroke)

	// Title.
	verdict, vcol := "fits", "#15803d"
	if !r.Feasible {
		verdict, vcol = "does not fit", colOver
	}
	fmt.Fprintf(&b, `<text x="%d" y="%d" font-size="17" font-weight="bold" fill="#111827">%s <tspan fill="%s">— %s</tspan></text>`+"\n",
		svgMargin, svgMargin+16, html.EscapeString(fmt.Sprintf("%s on %s", r.Model, r.inventoryName())), vcol, verdict)
	sub := fmt.Sprintf("weights %.1f GiB · KV %s · %d tokens × %d seqs · gpu-memory-utilization %g",
		gib(r.Weights.TotalBytes), r.Settings.KVCacheDType, r.Settings.MaxModelLen, r.Settings.MaxNumSeqs, r.Settings.GPUMemoryUtilization)
	text(&b, svgMargin, svgMargin+38, 12, "normal", "#374151", sub)
	if r.Feasible {
		p := r.Predicted
		text(&b, svgMargin, svgMargin+56, 12, "normal", "#374151", fmt.Sprintf(
			"predicted: %.0f tok/s decode (batch %d) · TPOT %.2f ms · TTFT %.1f ms · KV %d tokens · bottleneck: %s",
			p.DecodeTokensPerS, p.Batch, p.TPOTMs, p.TTFTMs, p.KVTokens, p.Bottleneck))
	}

	// Memory per GPU, by host and device index.
	mem := map[string]GPUMemory{}
	for _, m := range r.Memory {
		mem[fmt.Sprintf("%s/%d", m.Host, m.GPU)] = m
	}
	stageOf := map[string]Stage{}
	for _, s := range r.Stages {
		for _, g := range s.GPUs {
			stageOf[fmt.Sprintf("%s/%d", s.Host, g)] = s
		}
	}
	hostIndex := map[string]int{}
	for i, h := range hosts {
		hostIndex[h.Name] = i
		p := places[i]
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%d" height="%d" rx="10" fill="#f9fafb" stroke="%s" stroke-width="1.5"/>`+"\n",
			p.x, p.y, p.w, hostH, svgHostStroke)
		label := fmt.Sprintf("%s · %d× %s", h.Name, h.GPUs, r.gpuName(i))
		text(&b, p.x+svgHostPad, p.y+22, 13, "bold", "#111827", label)
		for g := 0; g < h.GPUs; g++ {
			gx := p.x + svgHostPad + g*(svgGPUW+svgGPUGap)
			gy := p.y + svgHostHead
			key := fmt.Sprintf("%s/%d", h.Name, g)
			s, used := stageOf[key]
			fill := "#ffffff"
			if used {
				fill = stageColors[s.Index%len(stageColors)]
			}
			fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%d" height="%d" rx="6" fill="%s" stroke="%s"/>`+"\n",
				gx, gy, svgGPUW, svgGPUH, fill, svgGPUStrokeColor)
			text(&b, gx+8, gy+17, 12, "bold", "#111827", fmt.Sprintf("GPU %d", g))
			if !used {
				text(&b, gx+8, gy+35, 11, "normal", "#6b7280", "unused")
				continue
			}
			text(&b, gx+8, gy+34, 11, "normal", "#111827", fmt.Sprintf("stage %d", s.Index))
			text(&b, gx+8, gy+49, 11, "normal", "#111827", fmt.Sprintf("layers %d–%d", s.Layers[0], s.Layers[1]-1))
			tpep := fmt.Sprintf("TP%d", s.TP)
			if s.EP > 1 {
				tpep += fmt.Sprintf(" EP%d", s.EP)
			}
			text(&b, gx+8, gy+64, 11, "normal", "#111827", tpep)
			if h := holds(s); h != "-" {
				text(&b, gx+8, gy+79, 10, "normal", "#4b5563", h)
			}
			if m, ok := mem[key]; ok {
				memBar(&b, gx+8, gy+90, svgGPUW-16, m)
			}
		}
		link := "PCIe"
		if r.nvlink(i) {
			link = "NVLink"
		}
		text(&b, p.x+svgHostPad, p.y+hostH-12, 11, "normal", "#374151", fmt.Sprintf("%s · %s", link, r.nicLabel(i)))
	}
	// Pipeline hops between hosts, in stage order.
	for s := 1; s < len(r.Stages); s++ {
		a, c := hostIndex[r.Stages[s-1].Host], hostIndex[r.Stages[s].Host]
		if a == c {
			continue
		}
		pa, pc := places[a], places[c]
		ya, yc := pa.y+svgHostHead+svgGPUH/2, pc.y+svgHostHead+svgGPUH/2
		if pc.y == pa.y && pc.x > pa.x {
			fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2" marker-end="url(#arrow)"/>`+"\n",
				pa.x+pa.w, ya, pc.x-2, yc, svgHostStroke)
			text(&b, pa.x+pa.w+6, ya-8, 10, "normal", "#374151", fmt.Sprintf("stage %d→%d", s-1, s))
		} else {
			yMid := pa.y + hostH + 25
			fmt.Fprintf(&b, `<polyline points="%d,%d %d,%d %d,%d %d,%d %d,%d" fill="none" stroke="%s" stroke-width="2" marker-end="url(#arrow)"/>`+"\n",
				pa.x+pa.w/2, pa.y+hostH, pa.x+pa.w/2, yMid, pc.x-10, yMid, pc.x-10, yc, pc.x-2, yc, svgHostStroke)
		}
	}
	// Legend.
	ly := height - svgMargin - 14
	x := svgMargin
	for _, l := range []struct{ col, name string }{{colWeights, "weights"}, {colKVNeeded, "KV needed"},
		{colKVPool, "KV pool (spare)"}, {colOverhead, "activations + reserve"}, {colUnbudgeted, "outside the budget (dashed line)"}, {colOver, "over budget"}} {
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="12" height="12" fill="%s" stroke="#9ca3af"/>`+"\n", x, ly-10, l.col)
		text(&b, x+16, ly, 11, "normal", "#374151", l.name)
		x += 34 + textWidth(l.name, 11)
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// memBar draws a GPU's memory as a stacked bar: weights, activations and
// reserve, the KV cache the settings need, spare KV pool; a dashed line marks
// the utilisation budget and anything above it is red.
func memBar(b *strings.Builder, x, y, w int, m GPUMemory) {
	total := float64(m.Total)
	if total <= 0 {
		return
	}
	used := float64(m.WeightsTotal + m.Activations + m.Reserve + m.KVRequired)
	scale := max(total, used) / float64(svgBarH)
	bottom := float64(y + svgBarH)
	yy := bottom
	seg := func(bytes int64, col string) {
		if bytes <= 0 {
			return
		}
		hh := float64(bytes) / scale
		yy -= hh
		fmt.Fprintf(b, `<rect x="%d" y="%.1f" width="30" height="%.1f" fill="%s"/>`+"\n", x, yy, hh, col)
	}
	fmt.Fprintf(b, `<rect x="%d" y="%.1f" width="30" height="%.1f" fill="%s" stroke="#9ca3af"/>`+"\n",
		x, bottom-total/scale, total/scale, colUnbudgeted)
	seg(m.WeightsTotal, colWeights)
	seg(m.Activations+m.Reserve, colOverhead)
	seg(m.KVRequired, colKVNeeded)
	seg(max(m.Headroom, 0), colKVPool)
	budgetY := bottom - float64(m.Budget)/scale
	if m.Headroom < 0 {
		fmt.Fprintf(b, `<rect x="%d" y="%.1f" width="30" height="%.1f" fill="%s" fill-opacity="0.75"/>`+"\n",
			x, yy, budgetY-yy, colOver)
	}
	fmt.Fprintf(b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#111827" stroke-dasharray="3,2"/>`+"\n",
		x-2, budgetY, x+32, budgetY)
	tx := x + 36
	text(b, tx, y+12, 10, "normal", "#111827", fmt.Sprintf("%.1f GiB", gib(m.Total)))
	text(b, tx, y+30, 10, "normal", colWeights, fmt.Sprintf("w %.1f", gib(m.WeightsTotal)))
	text(b, tx, y+46, 10, "normal", colKVNeeded, fmt.Sprintf("kv %.1f", gib(m.KVRequired)))
	hcol := "#15803d"
	if m.Headroom < 0 {
		hcol = colOver
	}
	text(b, tx, y+62, 10, "normal", hcol, fmt.Sprintf("%+.1f", gib(m.Headroom)))
	text(b, tx, y+78, 9, "normal", "#6b7280", "headroom")
}

func text(b *strings.Builder, x, y, size int, weight, col, s string) {
	fmt.Fprintf(b, `<text x="%d" y="%d" font-size="%d" font-weight="%s" fill="%s">%s</text>`+"\n",
		x, y, size, weight, col, html.EscapeString(s))
}

// textWidth estimates a label's width for layout (average glyph 0.6 em).
func textWidth(s string, size int) int { return int(float64(len([]rune(s))*size) * 0.6) }

func (r *PlanResult) gpuName(i int) string {
	if i < len(r.hw) {
		return r.hw[i].gpu.Name
	}
	return r.Hosts[i].GPU
}

func (r *PlanResult) nvlink(i int) bool {
	if i < len(r.hw) {
		return r.hw[i].nvlink
	}
	return r.Hosts[i].Interconnect == InterconnectNVLink
}

func (r *PlanResult) nicLabel(i int) string {
	var n NIC
	if i < len(r.hw) {
		n = r.hw[i].nic
	} else if len(r.Hosts[i].NICs) > 0 {
		n = r.Hosts[i].NICs[0]
	} else {
		n = defaultNIC
	}
	kind := "TCP"
	if n.RDMA {
		kind = "RDMA"
	}
	return fmt.Sprintf("%s %g Gb/s %s", n.Name, n.Gbps, kind)
}

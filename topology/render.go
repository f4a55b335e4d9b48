package topology

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
)

// WriteTable writes the plan as a readable report.
func (r *PlanResult) WriteTable(w io.Writer) error {
	if r.CPU != nil {
		return r.writeCPUTable(w) // cpuplan.go
	}
	var b strings.Builder
	verdict := "FITS"
	if !r.Feasible {
		verdict = "DOES NOT FIT"
	}
	fmt.Fprintf(&b, "glmtopo plan: %s on %s — %s\n", r.Model, r.inventoryName(), verdict)
	fmt.Fprintf(&b, "  weights %.1f GiB (%s); KV cache %s; %d tokens × %d sequences; gpu-memory-utilization %g; MTP %s\n\n",
		gib(r.Weights.TotalBytes), dtypeSummary(r.Weights.ByDType), r.Settings.KVCacheDType, r.Settings.MaxModelLen,
		r.Settings.MaxNumSeqs, r.Settings.GPUMemoryUtilization, mtpSummary(r.Settings))
	if len(r.Stages) > 0 {
		if !r.Feasible {
			b.WriteString("closest split tried:\n")
		}
		tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "STAGE\tHOST\tGPUS\tLAYERS\tTP\tEP\tHOLDS\tDECODE ms")
		for _, s := range r.Stages {
			ms := "-"
			if r.Feasible {
				ms = fmt.Sprintf("%.2f", s.DecodeMs)
			}
			fmt.Fprintf(tw, "%d\t%s\t%s\t[%d,%d)\t%d\t%d\t%s\t%s\n", s.Index, s.Host, gpuRange(s.GPUs), s.Layers[0], s.Layers[1],
				s.TP, s.EP, holds(s), ms)
		}
		tw.Flush()
		b.WriteString("\nmemory per GPU (GiB):\n")
		tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "HOST\tGPUS\tSTAGE\tWEIGHTS\tKV NEEDED\tKV POOL\tACTIV.\tGRAPHS\tRESERVE\tBUDGET\tHEADROOM\t")
		for _, g := range groupMemory(r.Memory) {
			fmt.Fprintf(tw, "%s\t%s\t%d\t%.1f\t%.1f\t%.1f\t%.1f\t%.1f\t%.1f\t%.1f\t%+.1f\t\n", g.m.Host, g.gpus, g.m.Stage,
				gib(g.m.WeightsTotal), gib(g.m.KVRequired), gib(g.m.KVCache), gib(g.m.Activations), gib(g.m.Graphs), gib(g.m.Reserve),
				gib(g.m.Budget), gib(g.m.Headroom))
		}
		tw.Flush()
	}
	if r.Feasible {
		p := r.Predicted
		fmt.Fprintf(&b, "\npredicted (batch %d in %d micro-batch(es), %d-token prompts, %d-token outputs):\n", p.Batch,
			p.MicroBatches, r.Settings.InputLen, r.Settings.OutputLen)
		fmt.Fprintf(&b, "  decode %.0f tokens/s   TPOT %.2f ms   TTFT %.1f ms\n", p.DecodeTokensPerS, p.TPOTMs, p.TTFTMs)
		if p.NoMTPDecodeTokensPerS > 0 {
			fmt.Fprintf(&b, "  MTP: %.2f tokens/step, ×%.2f over %.0f tokens/s without it\n", p.TokensPerStep,
				p.DecodeTokensPerS/p.NoMTPDecodeTokensPerS, p.NoMTPDecodeTokensPerS)
			if p.DecodeTokensPerS < p.NoMTPDecodeTokensPerS {
				b.WriteString("  MTP does not pay at this acceptance rate: consider --num-speculative-tokens 0\n")
			}
		}
		fmt.Fprintf(&b, "  KV cache %d tokens = max concurrency %.2f at %d tokens\n", p.KVTokens, p.MaxConcurrency, r.Settings.MaxModelLen)
		fmt.Fprintf(&b, "  bottleneck: %s\n", p.Bottleneck)
		if len(r.Alternatives) > 0 {
			b.WriteString("\nalternatives:\n")
			tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
			for _, a := range r.Alternatives {
				fmt.Fprintf(tw, "  %s\t%.0f tok/s\tTPOT %.2f ms\tTTFT %.1f ms\tKV %d tokens\n", a.Summary,
					a.Predicted.DecodeTokensPerS, a.Predicted.TPOTMs, a.Predicted.TTFTMs, a.Predicted.KVTokens)
			}
			tw.Flush()
		}
		if n := len(r.Experts); n > 0 {
			var replicated int
			for _, le := range r.Experts {
				for _, c := range le.Replicas {
					if c > 1 {
						replicated++
					}
				}
			}
			fmt.Fprintf(&b, "\nexpert placement: %d MoE layers on EP stages, %d replicated experts in all (see --output json)\n", n, replicated)
		}
	}
	if len(r.Rejected) > 0 {
		b.WriteString("\nrejected:\n")
		for _, x := range r.Rejected {
			fmt.Fprintf(&b, "  %s\n", x)
		}
	}
	fmt.Fprintf(&b, "\n%s\n", r.Reason)
	_, err := io.WriteString(w, b.String())
	return err
}

func (r *PlanResult) inventoryName() string {
	if len(r.hw) > 0 {
		return inventorySummary(r.hw)
	}
	var names []string
	for _, h := range r.Hosts {
		names = append(names, fmt.Sprintf("%s(%dx%s)", h.Name, h.GPUs, h.GPU))
	}
	return strings.Join(names, ",")
}

func dtypeSummary(m map[string]int64) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return m[keys[i]] > m[keys[j]] })
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %.1f GiB", k, gib(m[k])))
	}
	return strings.Join(parts, ", ")
}

func mtpSummary(s Settings) string {
	if !s.MTP {
		return "off"
	}
	return fmt.Sprintf("%d draft token(s), acceptance %g", s.SpeculativeTokens, s.MTPAcceptance)
}

func holds(s Stage) string {
	var h []string
	if s.Embedding {
		h = append(h, "embedding")
	}
	if s.LMHead {
		h = append(h, "lm_head")
	}
	if s.MTP {
		h = append(h, "mtp")
	}
	if len(h) == 0 {
		return "-"
	}
	return strings.Join(h, ",")
}

func gpuRange(g []int) string {
	if len(g) == 0 {
		return "-"
	}
	if len(g) == 1 {
		return fmt.Sprint(g[0])
	}
	return fmt.Sprintf("%d-%d", g[0], g[len(g)-1])
}

type memGroup struct {
	m    GPUMemory
	gpus string
}

// groupMemory folds consecutive GPUs of a stage whose figures agree to 0.1 GiB.
func groupMemory(ms []GPUMemory) []memGroup {
	var out []memGroup
	same := func(a, b GPUMemory) bool {
		r := func(x int64) int64 { return (x + 1<<29) / (1 << 30 / 10) }
		return a.Host == b.Host && a.Stage == b.Stage && r(a.WeightsTotal) == r(b.WeightsTotal) &&
			r(a.KVCache) == r(b.KVCache) && r(a.Activations) == r(b.Activations)
	}
	for i := 0; i < len(ms); {
		j := i + 1
		for j < len(ms) && same(ms[i], ms[j]) && ms[j].GPU == ms[j-1].GPU+1 {
			j++
		}
		worst := ms[i]
		for k := i; k < j; k++ {
			if ms[k].Headroom < worst.Headroom {
				worst = ms[k]
			}
		}
		g := fmt.Sprint(ms[i].GPU)
		if j-i > 1 {
			g = fmt.Sprintf("%d-%d", ms[i].GPU, ms[j-1].GPU)
		}
		out = append(out, memGroup{worst, g})
		i = j
	}
	return out
}

package serving

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"sort"
	"strconv"
	"strings"
)

// specCounters are the server's cumulative speculative-decoding counters, read from its
// Prometheus endpoint. We use vLLM's metric names (vllm:spec_decode_num_drafts_total,
// ..._num_draft_tokens_total, ..._num_accepted_tokens_total and
// ..._num_accepted_tokens_per_pos_total{position="k"}); glmtopo's server exports the same
// names under either the "vllm:" or the "glmtopo:" prefix. Reading counters before and after
// the run, rather than fields in each stream chunk, measures exactly the benchmark's window and
// works against vLLM unchanged.
type specCounters struct {
	drafts, draftTokens, accepted float64
	perPos                        map[int]float64
}

// SpecDecodeStats is the acceptance over the benchmark window.
type SpecDecodeStats struct {
	NumDrafts        int
	DraftTokens      int
	AcceptedTokens   int
	AcceptanceRate   float64 // percent
	AcceptanceLength float64 // 1 + accepted / drafts
	PerPositionRates []float64
}

func fetchSpecCounters(ctx context.Context, hc *http.Client, baseURL string) *specCounters {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, baseURL+"/metrics", nil)
	if err != nil {
		return nil
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil
	}
	return parseSpecCounters(io.LimitReader(resp.Body, 64<<20))
}

func parseSpecCounters(r io.Reader) *specCounters {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	c := &specCounters{perPos: map[int]float64{}}
	found := false
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		var rest string
		switch {
		case strings.HasPrefix(line, "vllm:spec_decode"):
			rest = line[len("vllm:spec_decode"):]
		case strings.HasPrefix(line, "glmtopo:spec_decode"):
			rest = line[len("glmtopo:spec_decode"):]
		default:
			continue
		}
		sp := strings.LastIndexByte(rest, ' ')
		if sp < 0 {
			continue
		}
		name, labels, _ := strings.Cut(rest[:sp], "{")
		name = strings.TrimSpace(name)
		if !strings.HasSuffix(name, "_total") {
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(rest[sp+1:]), 64)
		if err != nil {
			continue
		}
		found = true
		switch name {
		case "_num_drafts_total":
			c.drafts += v
		case "_num_draft_tokens_total":
			c.draftTokens += v
		case "_num_accepted_tokens_total":
			c.accepted += v
		case "_num_accepted_tokens_per_pos_total":
			if _, after, ok := strings.Cut(labels, `position="`); ok {
				if p, err := strconv.Atoi(after[:max(strings.IndexByte(after, '"'), 0)]); err == nil {
					c.perPos[p] += v
				}
			}
		}
	}
	if !found {
		return nil
	}
	return c
}

// specDelta is the acceptance between two scrapes, nil without draft tokens in between.
func specDelta(before, after *specCounters) *SpecDecodeStats {
	if before == nil || after == nil {
		return nil
	}
	s := &SpecDecodeStats{
		NumDrafts:      int(after.drafts - before.drafts),
		DraftTokens:    int(after.draftTokens - before.draftTokens),
		AcceptedTokens: int(after.accepted - before.accepted),
	}
	if s.DraftTokens <= 0 {
		return nil
	}
	s.AcceptanceRate = float64(s.AcceptedTokens) / float64(s.DraftTokens) * 100
	if s.NumDrafts > 0 {
		s.AcceptanceLength = 1 + float64(s.AcceptedTokens)/float64(s.NumDrafts)
		var pos []int
		for p := range after.perPos {
			pos = append(pos, p)
		}
		sort.Ints(pos)
		for _, p := range pos {
			s.PerPositionRates = append(s.PerPositionRates, (after.perPos[p]-before.perPos[p])/float64(s.NumDrafts))
		}
	}
	return s
}

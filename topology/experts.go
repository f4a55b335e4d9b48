package topology

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"

	"go.yaml.in/yaml/v3"

	"github.com/glmtopo/glmtopo/model"
)

// ExpertLoad is a measured routing histogram: per MoE layer, the number of
// tokens each routed expert received. Layers left out are taken as uniform.
//
//	layers:
//	  3: [1200, 35, 980, ...]   # n_routed_experts counts
type ExpertLoad struct {
	Layers map[int][]float64 `yaml:"layers" json:"layers"`
}

// ParseExpertLoad reads an expert-load YAML/JSON strictly.
func ParseExpertLoad(data []byte) (*ExpertLoad, error) {
	// JSON object keys are strings: read keys as text, then as layer numbers.
	var raw struct {
		Layers map[string][]float64 `yaml:"layers"`
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&raw); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("expert load: empty document (want layers: {LAYER: [counts...]})")
		}
		return nil, fmt.Errorf("expert load: %w (want layers: {LAYER: [counts...]})", err)
	}
	if len(raw.Layers) == 0 {
		return nil, errors.New("expert load: no layers")
	}
	l := &ExpertLoad{Layers: make(map[int][]float64, len(raw.Layers))}
	for k, v := range raw.Layers {
		n, err := strconv.Atoi(k)
		if err != nil {
			return nil, fmt.Errorf("expert load: layer %q is not a number (want layers: {LAYER: [counts...]})", k)
		}
		l.Layers[n] = v
	}
	return l, nil
}

// LoadExpertLoad reads an expert-load file.
func LoadExpertLoad(path string) (*ExpertLoad, error) {
	return loadFile(path, "expert load", ParseExpertLoad)
}

// validate checks the histogram against the model.
func (l *ExpertLoad) validate(cfg *model.Config) error {
	if l == nil {
		return nil
	}
	for layer, counts := range l.Layers {
		if layer < 0 || layer >= cfg.NumLayers() || cfg.LayerKind(layer) == model.LayerDense {
			return fmt.Errorf("expert load: layer %d is not an MoE layer (MoE layers are %d..%d)",
				layer, cfg.FirstKDenseReplace, cfg.NumLayers()-1)
		}
		if len(counts) != cfg.NRoutedExperts {
			return fmt.Errorf("expert load: layer %d has %d counts, the model has %d routed experts",
				layer, len(counts), cfg.NRoutedExperts)
		}
		var sum float64
		for e, c := range counts {
			if c < 0 || math.IsNaN(c) || math.IsInf(c, 0) {
				return fmt.Errorf("expert load: layer %d expert %d: count %g must be a non-negative number", layer, e, c)
			}
			sum += c
		}
		if sum == 0 {
			return fmt.Errorf("expert load: layer %d: all counts are zero", layer)
		}
	}
	return nil
}

// probs returns, for layer l, each expert's probability of being chosen by
// one token: k·load/Σload, capped at 1 (uniform k/E without a histogram).
func (l *ExpertLoad) probs(cfg *model.Config, layer int) []float64 {
	E, k := cfg.NRoutedExperts, float64(cfg.NumExpertsPerTok)
	p := make([]float64, E)
	var counts []float64
	if l != nil {
		counts = l.Layers[layer]
	}
	if counts == nil {
		for e := range p {
			p[e] = k / float64(E)
		}
		return p
	}
	var sum float64
	for _, c := range counts {
		sum += c
	}
	for e, c := range counts {
		p[e] = min(1, k*c/sum)
	}
	return p
}

// expertPlacement is one MoE layer's physical experts on the GPUs of an EP group.
type expertPlacement struct {
	gpus     [][]int   // per GPU, the logical experts it holds (one entry per replica)
	replicas []int     // per logical expert
	share    []float64 // per GPU, the expected fraction of the layer's expert tokens it serves
}

// eplb places load over gpus with slots physical experts in all, the way
// DeepSeek's EPLB does: give a replica to the expert with the highest load
// per replica until the redundant slots are used, then pack replicas
// heaviest-first onto the least-loaded GPU that has a free slot (and does not
// already hold that expert, when avoidable).
func eplb(load []float64, gpus, slots int) expertPlacement {
	E := len(load)
	if slots < E {
		slots = E
	}
	replicas := make([]int, E)
	for e := range replicas {
		replicas[e] = 1
	}
	for r := E; r < slots; r++ {
		best := 0
		for e := 1; e < E; e++ {
			if load[e]/float64(replicas[e]) > load[best]/float64(replicas[best]) {
				best = e
			}
		}
		replicas[best]++
	}
	type item struct {
		expert int
		weight float64
	}
	items := make([]item, 0, slots)
	for e, r := range replicas {
		for i := 0; i < r; i++ {
			items = append(items, item{e, load[e] / float64(r)})
		}
	}
	sort.SliceStable(items, func(a, b int) bool { return items[a].weight > items[b].weight })
	capacity := make([]int, gpus)
	for g := range capacity {
		capacity[g] = slots / gpus
		if g < slots%gpus {
			capacity[g]++
		}
	}
	pl := expertPlacement{gpus: make([][]int, gpus), replicas: replicas, share: make([]float64, gpus)}
	held := make([]map[int]bool, gpus)
	for g := range held {
		held[g] = map[int]bool{}
	}
	var total float64
	for _, it := range items {
		pick := -1
		for pass := 0; pass < 2 && pick < 0; pass++ {
			for g := 0; g < gpus; g++ {
				if len(pl.gpus[g]) >= capacity[g] || (pass == 0 && held[g][it.expert]) {
					continue
				}
				if pick < 0 || pl.share[g] < pl.share[pick] {
					pick = g
				}
			}
		}
		pl.gpus[pick] = append(pl.gpus[pick], it.expert)
		held[pick][it.expert] = true
		pl.share[pick] += it.weight
		total += it.weight
	}
	if total > 0 {
		for g := range pl.share {
			pl.share[g] /= total
		}
	}
	for g := range pl.gpus {
		sort.Ints(pl.gpus[g])
	}
	return pl
}

// touched is the expected number of distinct experts T tokens route to,
// Σ 1−(1−p_e)^T, counting replicas as sharing their expert's tokens.
func touched(p []float64, replicas []int, experts []int, T float64) float64 {
	var s float64
	for _, e := range experts {
		q := p[e]
		if replicas != nil {
			q /= float64(replicas[e])
		}
		s += 1 - math.Pow(1-q, T)
	}
	return s
}

package model

import (
	"fmt"
	"slices"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
)

// placementMask is a ReplicaMask over a placement of each MoE layer's
// experts (holders[layer][e]: the EP groups holding e, in placement order)
// seen from group; with tables it is a DeviceReplicaMask.
type placementMask struct {
	holders map[int][][]int
	group   int
	tables  map[int]*kernels.Tensor
}

func (m *placementMask) Replicated(l int) bool {
	for _, h := range m.holders[l] {
		if len(h) > 1 && slices.Contains(h, m.group) {
			return true
		}
	}
	return false
}

func (m *placementMask) Serves(l, token, e int) bool {
	h := m.holders[l][e]
	return h[token%len(h)] == m.group
}

func (m *placementMask) holds(l, e int) bool {
	h, ok := m.holders[l]
	return !ok || slices.Contains(h[e], m.group)
}

// deviceMask is m with its tables on be.
type deviceMask struct{ *placementMask }

func (m deviceMask) Table(l int) *kernels.Tensor { return m.tables[l] }

// upload puts every replicated layer's [E, 2] table on be.
func (m *placementMask) upload(t *testing.T, be kernels.Backend) {
	m.tables = map[int]*kernels.Tensor{}
	for l, hs := range m.holders {
		if !m.Replicated(l) {
			continue
		}
		var v []int32
		for _, h := range hs {
			v = append(v, int32(len(h)), int32(slices.Index(h, m.group)))
		}
		tab, err := be.NewTensor(kernels.I32, len(hs), 2)
		if err != nil {
			t.Fatal(err)
		}
		if err := be.Upload(tab, i32Bytes(v)); err != nil {
			t.Fatal(err)
		}
		m.tables[l] = tab
	}
}

// counting counts the replica masks and id downloads of its backend.
type counting struct {
	*cpu.Backend
	masks, idDownloads int
}

func (c *counting) MaskReplicas(w, ids, tab *kernels.Tensor) error {
	c.masks++
	return c.Backend.MaskReplicas(w, ids, tab)
}

func (c *counting) DownloadI32(t *kernels.Tensor) ([]int32, error) {
	c.idDownloads++
	return c.Backend.DownloadI32(t)
}

// hostOnly hides the backend's ReplicaMasker (and every other extension).
type hostOnly struct{ kernels.Backend }

// TestReplicaMaskDeviceMatchesHost: a rank holding some experts of each MoE
// layer, several of them replicated on other (absent) groups, gives the
// same logits bit for bit whether its routes are masked by the device
// table (kernels.ReplicaMasker) or on the host; the mask changes them.
func TestReplicaMaskDeviceMatchesHost(t *testing.T) {
	c, err := Resolve("tiny")
	if err != nil {
		t.Fatal(err)
	}
	E := c.NRoutedExperts
	for _, group := range []int{0, 1, 2} {
		t.Run(fmt.Sprintf("group %d", group), func(t *testing.T) {
			m := &placementMask{holders: map[int][][]int{}, group: group}
			for l := c.FirstKDenseReplace; l < c.NumHiddenLayers; l++ {
				hs := make([][]int, E)
				for e := range hs {
					switch (e + l) % 4 {
					case 0:
						hs[e] = []int{e % 3} // alone
					case 1:
						hs[e] = []int{(e + 1) % 3, e % 3} // two replicas
					default:
						hs[e] = []int{(e + l) % 3, (e + l + 1) % 3, (e + l + 2) % 3} // on every group
					}
				}
				m.holders[l] = hs
			}
			cb := &counting{Backend: cpu.New(1)}
			sel := WholeModel(c)
			sel.MTP = false
			sel.Expert = m.holds
			w, free, err := DummyWeights(c, sel, cb.Backend, 5)
			if err != nil {
				t.Fatal(err)
			}
			defer free()
			m.upload(t, cb)
			plain := *m
			plain.tables = nil
			ids := []int32{5, 17, 900, 3, 3, 44, 1002, 256, 9}
			device := replicaLogits(t, c, w, cb, deviceMask{m}, ids)
			if cb.masks == 0 || cb.idDownloads != 0 {
				t.Fatalf("device path: %d masks on the device, %d id downloads", cb.masks, cb.idDownloads)
			}
			host := replicaLogits(t, c, w, hostOnly{cb}, &plain, ids)
			if cb.idDownloads == 0 {
				t.Fatal("host path: no id download")
			}
			none := replicaLogits(t, c, w, cb, nil, ids)
			if !slices.Equal(device, host) {
				t.Fatalf("device and host masks give different logits (max |diff| %g)", maxDiff(device, host))
			}
			if slices.Equal(device, none) {
				t.Fatal("the mask changed no logit")
			}
			t.Logf("%d device masks; %g max |change| from the unmasked logits", cb.masks, maxDiff(device, none))
		})
	}
}

// replicaLogits runs a prefill of ids through every layer of w on be
// (weights loaded there) with the replica mask rm, and returns the logits.
func replicaLogits(t *testing.T, c *Config, w *Weights, be kernels.Backend, rm ReplicaMask, ids []int32) []float32 {
	t.Helper()
	T := len(ids)
	b := &kernels.Batch{BlockTables: [][]int32{{0}}, ContextLens: []int32{int32(T)}}
	for p := 0; p < T; p++ {
		b.Positions = append(b.Positions, int32(p))
		b.SeqIndex = append(b.SeqIndex, 0)
		b.Slots = append(b.Slots, int32(p))
	}
	meta, err := be.UploadBatch(b)
	if err != nil {
		t.Fatal(err)
	}
	var rc *RankComm
	if rm != nil {
		rc = &RankComm{Replicas: rm, SharedExpert: true}
	}
	f := &Forward{Cfg: c, BE: be, Meta: meta, T: T, Ranks: rc}
	defer f.Release()
	h, err := f.Embed(w.Embed, ids)
	if err != nil {
		t.Fatal(err)
	}
	for _, lw := range w.Layers {
		cache := &kernels.KVCache{K: f.tmpOf(kernels.F32, 16, c.NumKeyValueHeads, c.HeadDim),
			V: f.tmpOf(kernels.F32, 16, c.NumKeyValueHeads, c.HeadDim), BlockSize: 16, KVHeads: c.NumKeyValueHeads, HeadDim: c.HeadDim}
		if err := f.Layer(lw, h, cache); err != nil {
			t.Fatalf("layer %d: %v", lw.Index, err)
		}
	}
	_, logits, err := f.Head(h, w.FinalNorm, w.LMHead)
	if err != nil {
		t.Fatal(err)
	}
	out, err := be.Download(logits)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func maxDiff(a, b []float32) float64 {
	var d float64
	for i := range a {
		d = max(d, float64(abs32(a[i]-b[i])))
	}
	return d
}

func abs32(x float32) float32 {
	if x < 0 {
		return -x
	}
	return x
}

package topology

import (
	"fmt"
	"io"
	"math"

	"github.com/glmtopo/glmtopo/model"
)

// The memory model: one GPU's memory as vLLM's --gpu-memory-utilization
// divides it. The planner predicts it (PlanRequest → GPUMemory) and the
// engine sizes its KV cache with it (parallel.NewEngine, from numbers it
// measures), both through MemoryPlan.Size, so that `glmtopo plan` and a
// running engine print the same split:
//
//	KV cache = ⌊(total × utilization − weights − activations − graphs − runtime − reserve) / block⌋ blocks
//
// Weights are the bytes of the GPU's tensors; activations the peak of the
// steps up to the worst case (max-num-batched-tokens tokens over
// max-num-seqs sequences: the engine's workspace plus the backend's
// scratch, whose peak can come from a narrower step's kernel path); graphs
// the decode graphs' persistent activations; runtime what the device holds
// outside the allocator (CUDA context, kernel modules, cuBLAS; `glmtopo
// plan --runtime-reserve-gib` is runtime + reserve).

// MemoryPlan is one GPU's memory split, in bytes.
type MemoryPlan struct {
	Total       int64   `json:"total" yaml:"total"`
	Utilization float64 `json:"gpu_memory_utilization" yaml:"gpu_memory_utilization"`
	Weights     int64   `json:"weights" yaml:"weights"`
	// Activations is the worst-case step's peak beyond the weights and KV
	// cache; Workspace the part of it allocated once at start for the
	// step's activations (the rest is the backend's scratch).
	Activations int64 `json:"activations" yaml:"activations"`
	Workspace   int64 `json:"workspace" yaml:"workspace"`
	Graphs      int64 `json:"graphs" yaml:"graphs"`
	Runtime     int64 `json:"runtime" yaml:"runtime"`
	Reserve     int64 `json:"reserve" yaml:"reserve"`

	BlockSize     int   `json:"block_size" yaml:"block_size"`
	KVBlockBytes  int64 `json:"kv_block_bytes" yaml:"kv_block_bytes"` // one block over every layer, K and V
	KVBlocks      int   `json:"kv_blocks" yaml:"kv_blocks"`
	KVBytes       int64 `json:"kv_bytes" yaml:"kv_bytes"`
	MaxModelLen   int   `json:"max_model_len" yaml:"max_model_len"`
	MaxNumSeqs    int   `json:"max_num_seqs" yaml:"max_num_seqs"`
	BatchedTokens int   `json:"max_num_batched_tokens" yaml:"max_num_batched_tokens"`
	// Source says how KVBlocks was chosen: "profiled", "estimated",
	// "--kv-cache-memory-bytes" or "--num-gpu-blocks-override".
	Source string `json:"source" yaml:"source"`
}

// Budget is total × utilization.
func (m MemoryPlan) Budget() int64 { return int64(float64(m.Total) * m.Utilization) }

// NonKV is everything the budget holds besides the KV cache.
func (m MemoryPlan) NonKV() int64 {
	return m.Weights + m.Activations + m.Graphs + m.Runtime + m.Reserve
}

// Used is the GPU's planned memory: NonKV plus the KV cache.
func (m MemoryPlan) Used() int64 { return m.NonKV() + m.KVBytes }

// KVTokens is the tokens the KV cache holds.
func (m MemoryPlan) KVTokens() int { return m.KVBlocks * m.BlockSize }

// MaxConcurrency is how many MaxModelLen-token requests the cache holds at
// once (vLLM's "Maximum concurrency for N tokens per request").
func (m MemoryPlan) MaxConcurrency() float64 {
	if m.MaxModelLen <= 0 {
		return 0
	}
	return float64(m.KVTokens()) / float64(m.MaxModelLen)
}

// Size sets KVBlocks and KVBytes: kvBytes > 0 (--kv-cache-memory-bytes) or
// blocks > 0 (--num-gpu-blocks-override, or another name the caller put in
// Source) choose the cache; otherwise it gets what the budget leaves, in
// whole blocks. It fails with a sentence
// saying what does not fit and what to change when the cache cannot hold
// one max-model-len request, or an override passes the device's memory.
func (m *MemoryPlan) Size(kvBytes int64, blocks int) error {
	if m.BlockSize <= 0 || m.KVBlockBytes <= 0 {
		return fmt.Errorf("memory plan: KV block of %d tokens, %d bytes", m.BlockSize, m.KVBlockBytes)
	}
	if m.Utilization <= 0 || m.Utilization > 1 || math.IsNaN(m.Utilization) {
		return fmt.Errorf("--gpu-memory-utilization %g is outside (0, 1]", m.Utilization)
	}
	auto := m.Source == "" || m.Source == "profiled" || m.Source == "estimated"
	switch {
	case blocks > 0:
		m.KVBlocks = blocks
		if auto {
			m.Source = "--num-gpu-blocks-override"
		}
	case kvBytes > 0:
		m.KVBlocks, m.Source = int(kvBytes/m.KVBlockBytes), "--kv-cache-memory-bytes"
	default:
		left := m.Budget() - m.NonKV()
		m.KVBlocks = int(max(left, 0) / m.KVBlockBytes)
		if m.Source == "" {
			m.Source = "estimated"
		}
	}
	m.KVBytes = int64(m.KVBlocks) * m.KVBlockBytes
	need := (max(m.MaxModelLen, 1) + m.BlockSize - 1) / m.BlockSize
	if m.Total > 0 && m.Used() > m.Total {
		return fmt.Errorf("the KV cache of %s does not fit: %s besides it plus %s of cache pass the GPU's %s; lower %s",
			m.Source, gibStr(m.NonKV()), gibStr(m.KVBytes), gibStr(m.Total), m.Source)
	}
	if m.KVBlocks < need {
		if m.Source != "profiled" && m.Source != "estimated" {
			return fmt.Errorf("%s gives %d KV blocks (%d tokens), fewer than one --max-model-len %d request needs (%d blocks)",
				m.Source, m.KVBlocks, m.KVTokens(), m.MaxModelLen, need)
		}
		return fmt.Errorf("no room for the KV cache: of the %s budget (%s × --gpu-memory-utilization %g), weights take %s, "+
			"activations of a %d-token step %s, decode graphs %s and the runtime %s, leaving %s for %d tokens; "+
			"one --max-model-len %d request needs %s: raise --gpu-memory-utilization, lower --max-num-batched-tokens "+
			"or --max-model-len, use --kv-cache-dtype fp8, or give the model more GPUs (glmtopo plan)",
			gibStr(m.Budget()), gibStr(m.Total), m.Utilization, gibStr(m.Weights), m.BatchedTokens, gibStr(m.Activations),
			gibStr(m.Graphs), gibStr(m.Runtime+m.Reserve), gibStr(max(m.Budget()-m.NonKV(), 0)), m.KVTokens(),
			m.MaxModelLen, gibStr(int64(need)*m.KVBlockBytes))
	}
	return nil
}

// Write prints the plan as the engine logs it at start.
func (m MemoryPlan) Write(w io.Writer) {
	if m.Total == 0 { // a backend without device memory: sizes only
		fmt.Fprintf(w, "memory plan (%s): weights %s, activations %s (workspace %s)\n", m.Source, gibStr(m.Weights),
			gibStr(m.Activations), gibStr(m.Workspace))
		fmt.Fprintf(w, "KV cache: %s, %d blocks of %d tokens = %d tokens\n", gibStr(m.KVBytes), m.KVBlocks, m.BlockSize, m.KVTokens())
		fmt.Fprintf(w, "Maximum concurrency for %d tokens per request: %.2fx\n", m.MaxModelLen, m.MaxConcurrency())
		return
	}
	fmt.Fprintf(w, "memory plan (%s): budget %s = %s × %g; weights %s, activations %s (workspace %s), decode graphs %s, runtime %s, reserve %s\n",
		m.Source, gibStr(m.Budget()), gibStr(m.Total), m.Utilization, gibStr(m.Weights), gibStr(m.Activations), gibStr(m.Workspace),
		gibStr(m.Graphs), gibStr(m.Runtime), gibStr(m.Reserve))
	fmt.Fprintf(w, "KV cache: %s, %d blocks of %d tokens = %d tokens; planned total %s of %s\n",
		gibStr(m.KVBytes), m.KVBlocks, m.BlockSize, m.KVTokens(), gibStr(m.Used()), gibStr(m.Total))
	fmt.Fprintf(w, "Maximum concurrency for %d tokens per request: %.2fx\n", m.MaxModelLen, m.MaxConcurrency())
}

// gibStr writes bytes in GiB, or MiB below one GiB.
func gibStr(b int64) string {
	if b < 1<<30 && b > -(1<<30) {
		return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
	}
	return fmt.Sprintf("%.2f GiB", float64(b)/(1<<30))
}

// StepShape is the worst-case step the activation estimate is for.
type StepShape struct {
	Tokens int  // max-num-batched-tokens
	Seqs   int  // max-num-seqs (rows of the lm_head)
	GPUs   int  // tensor-parallel GPUs of the stage (1: one GPU)
	EP     bool // routed experts placed whole by expert parallelism
	Head   bool // the stage runs lm_head
	FP8    bool // FP8 weights (the wide GEMMs expand them to bf16 scratch)
}

// ActivationBytes estimates the peak activation memory of one step on one
// GPU: WorkspaceBytes plus ScratchBytes. On one GPU the engine measures it
// instead (a profiled step); the planner, and engines that cannot measure,
// use this.
func ActivationBytes(c *model.Config, s StepShape) int64 {
	return WorkspaceBytes(c, s) + ScratchBytes(c, s)
}

// WorkspaceBytes is the engine's step workspace (parallel/workspace.go):
// the token ids and residual stream, then the widest layer's f32
// temporaries (unfused: the shared expert's own), reused layer after layer
// and then by the head's rows.
func WorkspaceBytes(c *model.Config, s StepShape) int64 {
	T := int64(max(s.Tokens, 1))
	n := int64(max(s.GPUs, 1))
	H, Q, KV := int64(c.HiddenSize), int64(c.QDim())/n, int64(c.KVDim())/n
	k, E := int64(c.NumExpertsPerTok), int64(c.NRoutedExperts)
	persist := align(4*T) + align(4*T*H)
	attn := align(4*T*H)*2 + align(4*T*Q)*2 + align(4*T*KV)*2
	dense := attn + align(4*T*int64(c.IntermediateSize)/n)*2 + align(4*T*H)
	shared := int64(c.MoEIntermediateSize) * int64(max(c.NSharedExperts, 1)) / n
	moe := attn + align(4*T*E) + 2*align(4*T*k) + align(4*T*H) + align(4*T*shared)*2 + align(4*T*H)
	var head int64
	if s.Head { // after the last layer, in the layers' space: gathered rows, normed rows, logits
		rows := int64(max(s.Seqs, 1))
		head = align(4*rows) + 2*align(4*rows*H) + align(4*rows*int64(c.VocabSize)/n)
	}
	return persist + max(dense, moe, head)
}

// ScratchBytes is the CUDA backend's scratch peak over the steps of up to
// s.Tokens tokens (kernels/cuda), the larger of:
//   - the grouped MoE of the widest step, sized for the worst routing
//     (moe_wide.go: every expert on the GPU active, its rows padded to 128;
//     gathered bf16 inputs, f32 gate/up, bf16 activations, f32 down), FP8
//     experts expanded to bf16 copies 16 at a time;
//   - the widest dense GEMM (linear.go's cuBLAS path: the input as bf16,
//     an FP8 weight's bf16 copy), over q_proj, o_proj and the dense MLP;
//
// both as `glmtopo serve` runs them (--fast-gemm, the default: activations
// rounded to bf16 once, no hi+lo halves);
//   - the narrow MoE kernels' scratch at the widest step they take.
func ScratchBytes(c *model.Config, s StepShape) int64 {
	T := int64(max(s.Tokens, 1))
	n := int64(max(s.GPUs, 1))
	H, Q := int64(c.HiddenSize), int64(c.QDim())/n
	k, E := int64(c.NumExpertsPerTok), int64(c.NRoutedExperts)
	I := int64(c.MoEIntermediateSize)
	present := E
	if s.EP {
		present = max(E/n, 1)
	} else {
		I /= n
	}
	var moe int64
	if E > 0 && k > 0 {
		A := T * k
		const padRows = 128
		rows := A + min(present, A)*(padRows-1)
		moe = align(4*(3*E+2+3*A)) + align(2*rows*H) + 2*align(4*rows*I) + align(2*rows*I) + align(4*rows*H)
		if s.FP8 {
			moe += align(2 * min(present, 16) * 2 * I * H)
		}
		moe += align(8 * 9 * present)
		// Below the grouped path (experts averaging 16 tokens): plan, h, y
		// and the activation planes.
		tn := min(T, max((16*present+k-1)/k-1, 1))
		an := tn * k
		moe = max(moe, align(4*(2*E+2+2*an))+4*an*I+4*an*H+4*tn*H+4*an*I+512)
	}
	var gemm int64
	dense := int64(c.IntermediateSize) / n
	for _, nk := range [][2]int64{{Q, H}, {H, Q}, {dense, H}, {H, dense}} {
		N, K := nk[0], nk[1]
		if N <= 0 || K <= 0 {
			continue
		}
		g := 2 * T * K
		if s.FP8 {
			g += 2 * N * K
		}
		gemm = max(gemm, g)
	}
	return max(moe, gemm)
}

// GraphBytes estimates the decode graphs' persistent memory on one GPU:
// per sequence bucket (1, 2, 4, 8, then steps as parallel's seqBuckets)
// one arena of a padded decode step's activations, and per graph (sequence
// bucket × context bucket, 256 doubling up to maxContext) its batch
// metadata and the driver's instantiated graph.
func GraphBytes(c *model.Config, maxSeqs, maxContext, blockSize int, head bool) int64 {
	if maxSeqs <= 0 {
		return 0
	}
	perRow := WorkspaceBytes(c, StepShape{Tokens: 1, Seqs: 1, Head: head})
	const perGraph = 2 << 20 // the driver's instantiated graph: ~1000 kernel nodes
	var total int64
	for _, seqs := range SeqBuckets(maxSeqs) {
		total += int64(seqs) * perRow
		for _, ctx := range CtxBuckets(256, maxContext) {
			total += perGraph + int64(seqs)*int64(3+(ctx+blockSize-1)/max(blockSize, 1))*4
		}
	}
	return total
}

// CtxBuckets are the decode graphs' padded context lengths: minCtx
// doubling up to maxCtx, which is the last.
func CtxBuckets(minCtx, maxCtx int) []int {
	var out []int
	for c := minCtx; c < maxCtx; c *= 2 {
		out = append(out, c)
	}
	return append(out, maxCtx)
}

// SeqBuckets are the decode graphs' padded batch sizes: 1, 2, 4, 8, then
// steps of 8 to 32, of 16 to 64, of 32 to 128 and so on (past 16
// sequences padding fills less than a third of a batch), the last maxSeqs.
func SeqBuckets(maxSeqs int) []int {
	var out []int
	for b := 1; b < maxSeqs; {
		out = append(out, b)
		if b < 8 {
			b *= 2
			continue
		}
		p := 8
		for p*2 <= b {
			p *= 2
		}
		b += max(8, p/2)
	}
	return append(out, maxSeqs)
}

// align rounds a workspace slice up to 256 bytes, as the engine carves them.
func align(n int64) int64 { return (n + 255) &^ 255 }

// DefaultReserve is the headroom the engine keeps inside the budget beyond
// what it measured: allocator fragmentation and kernels' first-use scratch.
const DefaultReserve = 512 << 20

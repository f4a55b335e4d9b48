package parallel

import (
	"path/filepath"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/kernels/cuda/cudatest"
	"github.com/glmtopo/glmtopo/model/modeltest"
)

// TestFP8KVCacheOnGPU runs the tiny fixtures on one GPU with an e4m3 KV
// cache (--kv-cache-dtype fp8: qk_norm_rope_kv_fp8, attention_mma for
// decode and prefill tiles, attention_flash for prompts), with decode
// graphs and eagerly, against the CPU engine with an f32 cache, by the
// bounds of TestFP8KVCacheFixtures. Skips without a GPU.
func TestFP8KVCacheOnGPU(t *testing.T) {
	be := cudatest.Open(t, cuda.Options{})
	for _, name := range []string{"tiny", "tiny_qknorm"} {
		root := filepath.Join("..", "testdata", "glm4moe", name)
		dir := filepath.Join(root, "model")
		g := modeltest.OpenGolden(t, root)
		w := modeltest.LoadWeights(t, be, dir)
		cb := cpu.New(0)
		ref, err := NewEngine(cb, modeltest.LoadWeights(t, cb, dir), EngineOptions{BlockSize: 16, MaxTokens: 512, KVDType: kernels.F32})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(ref.Close)
		for _, eager := range []bool{false, true} {
			t.Run(name+map[bool]string{false: "/graphs", true: "/eager"}[eager], func(t *testing.T) {
				e, err := NewEngine(be, w, EngineOptions{BlockSize: 16, MaxTokens: 512, KVDType: kernels.F8E4M3,
					EnforceEager: eager, GraphMinContext: 16})
				if err != nil {
					t.Fatal(err)
				}
				defer e.Close()
				for _, l := range e.KV.Layers {
					l.KScale, l.VScale = 0.5, 2
				}
				fp8KVAgainst(t, e, ref, g)
			})
		}
	}
}

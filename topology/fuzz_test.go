package topology

import "testing"

// FuzzParseInventory: arbitrary input gives an inventory that validates, or an error; never a panic.
func FuzzParseInventory(f *testing.F) {
	f.Add([]byte("hosts:\n- {name: a, gpu: H200, gpus: 4, gpu_memory: 80GB, nics: [{name: x, rdma: true, gbps: 400}]}\n"))
	f.Add([]byte("hosts: {a: 1}"))
	f.Add([]byte("hosts:\n- {name: a, gpu: H200, gpus: 99999999999999999999}\n"))
	f.Add([]byte("hosts:\n- {name: a, gpu: H200, gpus: 4, gpu_memory: [1]}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		inv, err := ParseInventory(data)
		if err == nil {
			if verr := inv.Validate(); verr != nil {
				t.Fatalf("accepted an invalid inventory: %v", verr)
			}
		}
	})
}

// FuzzParseHosts: the shorthand parser never panics and only accepts valid inventories.
func FuzzParseHosts(f *testing.F) {
	for _, s := range []string{"2x4xH100-80G", "1x4xH200,1x4xH100-80G", "x", "1x1x", "99999999999999999999x1xH100"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		inv, err := ParseHosts(s)
		if err == nil && inv.Validate() != nil {
			t.Fatalf("accepted %q", s)
		}
	})
}

package node

import (
	"bytes"
	"errors"
	"fmt"

	"github.com/ebitengine/purego"
)

// nvml is the subset of the NVML C API the inventory needs, bound at run
// time so the binary stays CGO-free and runs on hosts without a driver.
type nvml struct {
	init       func() int32
	shutdown   func() int32
	errString  func(int32) string
	count      func(*uint32) int32
	handle     func(uint32, *uintptr) int32
	name       func(uintptr, *byte, uint32) int32
	uuid       func(uintptr, *byte, uint32) int32
	memory     func(uintptr, *nvmlMemory) int32
	pciInfo    func(uintptr, *nvmlPCIInfo) int32
	nvlinkStat func(uintptr, uint32, *int32) int32
}

// nvmlMemory mirrors nvmlMemory_t.
type nvmlMemory struct{ Total, Free, Used uint64 }

// nvmlPCIInfo mirrors nvmlPciInfo_t (v3).
type nvmlPCIInfo struct {
	BusIDLegacy    [16]byte
	Domain         uint32
	Bus            uint32
	Device         uint32
	PCIDeviceID    uint32
	PCISubSystemID uint32
	BusID          [32]byte
}

const (
	nvmlSuccess        = 0
	nvmlNVLinkMaxLinks = 18
)

var nvmlLibNames = []string{"libnvidia-ml.so.1", "libnvidia-ml.so"}

// detectGPUs lists the GPUs NVML sees. An error means "no usable NVML".
func detectGPUs(path string) ([]GPU, error) {
	names := nvmlLibNames
	if path != "" {
		names = []string{path}
	}
	var lib uintptr
	var errs []error
	for _, n := range names {
		h, err := purego.Dlopen(n, purego.RTLD_NOW|purego.RTLD_GLOBAL)
		if err == nil {
			lib = h
			break
		}
		errs = append(errs, err)
	}
	if lib == 0 {
		return nil, fmt.Errorf("NVML not loadable: %w", errors.Join(errs...))
	}
	var n nvml
	if err := bindNVML(lib, &n); err != nil {
		return nil, err
	}
	if rc := n.init(); rc != nvmlSuccess {
		return nil, fmt.Errorf("nvmlInit: %s", n.errString(rc))
	}
	defer n.shutdown()
	var count uint32
	if rc := n.count(&count); rc != nvmlSuccess {
		return nil, fmt.Errorf("nvmlDeviceGetCount: %s", n.errString(rc))
	}
	gpus := make([]GPU, 0, count)
	for i := uint32(0); i < count; i++ {
		var h uintptr
		if rc := n.handle(i, &h); rc != nvmlSuccess {
			return gpus, fmt.Errorf("gpu %d: nvmlDeviceGetHandleByIndex: %s", i, n.errString(rc))
		}
		g := GPU{Index: int(i)}
		buf := make([]byte, 96)
		if n.name(h, &buf[0], uint32(len(buf))) == nvmlSuccess {
			g.Name = cString(buf)
		}
		if n.uuid(h, &buf[0], uint32(len(buf))) == nvmlSuccess {
			g.UUID = cString(buf)
		}
		var m nvmlMemory
		if n.memory(h, &m) == nvmlSuccess {
			g.MemoryBytes = m.Total
		}
		var pci nvmlPCIInfo
		if n.pciInfo(h, &pci) == nvmlSuccess {
			g.PCIBusID = cString(pci.BusID[:])
		}
		for link := uint32(0); link < nvmlNVLinkMaxLinks; link++ {
			var active int32
			if n.nvlinkStat(h, link, &active) == nvmlSuccess && active != 0 {
				g.NVLinks++
			}
		}
		gpus = append(gpus, g)
	}
	return gpus, nil
}

func bindNVML(lib uintptr, n *nvml) (err error) {
	// RegisterLibFunc panics on a missing symbol; an old driver must not
	// crash the daemon.
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("NVML: %v", r)
		}
	}()
	purego.RegisterLibFunc(&n.init, lib, "nvmlInit_v2")
	purego.RegisterLibFunc(&n.shutdown, lib, "nvmlShutdown")
	purego.RegisterLibFunc(&n.errString, lib, "nvmlErrorString")
	purego.RegisterLibFunc(&n.count, lib, "nvmlDeviceGetCount_v2")
	purego.RegisterLibFunc(&n.handle, lib, "nvmlDeviceGetHandleByIndex_v2")
	purego.RegisterLibFunc(&n.name, lib, "nvmlDeviceGetName")
	purego.RegisterLibFunc(&n.uuid, lib, "nvmlDeviceGetUUID")
	purego.RegisterLibFunc(&n.memory, lib, "nvmlDeviceGetMemoryInfo")
	purego.RegisterLibFunc(&n.pciInfo, lib, "nvmlDeviceGetPciInfo_v3")
	purego.RegisterLibFunc(&n.nvlinkStat, lib, "nvmlDeviceGetNvLinkState")
	return nil
}

func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

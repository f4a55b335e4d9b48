package nccl

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// emulateHost gives the calling OS thread a UTS namespace of its own named
// host (InitOptions.Host; tests and development only). The caller must have
// locked its goroutine to the thread and never unlock it: the namespace is
// the thread's, and a Go thread that left the process's namespace must not
// run other goroutines (ending the locked goroutine retires the thread).
// Other threads, the process's hostname included, are untouched.
func emulateHost(host string) error {
	if err := unix.Unshare(unix.CLONE_NEWUTS); err != nil {
		return fmt.Errorf("emulated host %q: unshare UTS namespace: %w", host, err)
	}
	if err := unix.Sethostname([]byte(host)); err != nil {
		return fmt.Errorf("emulated host %q: sethostname: %w", host, err)
	}
	return nil
}

// Package cudastage implements transport.Stager on a CUDA device: two
// page-locked host slots and a copy stream, so that a TCP link moves device
// tensors with each chunk's PCIe copy overlapping the previous chunk's
// socket write (or read).
package cudastage

import (
	"errors"
	"fmt"

	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/transport"
)

// Stager is one link direction's staging (not safe for concurrent use:
// each of a link's sender and receiver gets its own).
type Stager struct {
	dev    *cuda.Device
	slots  [][]byte
	stream uintptr
	events []uintptr
}

var _ transport.Stager = (*Stager)(nil)

// New allocates two slots of chunk bytes (4 MiB is a good size: large enough
// for full-speed copies, small enough to pipeline a 10 MiB tensor).
func New(dev *cuda.Device, chunk int) (*Stager, error) {
	s := &Stager{dev: dev}
	var err error
	if s.stream, err = dev.NewStream(); err != nil {
		return nil, err
	}
	for range 2 {
		b, err := dev.HostAlloc(chunk)
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("staging buffer: %w", err)
		}
		s.slots = append(s.slots, b)
		e, err := dev.NewEvent()
		if err != nil {
			s.Close()
			return nil, err
		}
		s.events = append(s.events, e)
	}
	return s, nil
}

// Slots returns the page-locked buffers.
func (s *Stager) Slots() [][]byte { return s.slots }

// ToHost queues a device-to-slot copy.
func (s *Stager) ToHost(slot int, src uintptr, n int) error {
	if err := s.dev.CopyToHostAsync(s.slots[slot][:n], src, s.stream); err != nil {
		return err
	}
	return s.dev.RecordEvent(s.events[slot], s.stream)
}

// ToDevice queues a slot-to-device copy.
func (s *Stager) ToDevice(slot int, dst uintptr, n int) error {
	if err := s.dev.CopyToDeviceAsync(dst, s.slots[slot][:n], s.stream); err != nil {
		return err
	}
	return s.dev.RecordEvent(s.events[slot], s.stream)
}

// Wait blocks until the slot's last copy is done.
func (s *Stager) Wait(slot int) error { return s.dev.SyncEvent(s.events[slot]) }

// Close frees the slots, events and stream.
func (s *Stager) Close() error {
	var errs []error
	for _, e := range s.events {
		errs = append(errs, s.dev.DestroyEvent(e))
	}
	for _, b := range s.slots {
		errs = append(errs, s.dev.HostFree(b))
	}
	if s.stream != 0 {
		errs = append(errs, s.dev.DestroyStream(s.stream))
	}
	return errors.Join(errs...)
}

package transport

import (
	"errors"
	"fmt"
)

// Error is what every link operation returns on failure: it names the peer,
// the operation and the step (or the last good step when the failing
// message's own header was not read yet).
type Error struct {
	Op      string // "send" or "recv"
	Peer    string
	Step    uint64
	StepSet bool // false: Step is the last step completed on this link
	Err     error
}

func (e *Error) Error() string {
	dir := "to"
	if e.Op == "recv" {
		dir = "from"
	}
	step := fmt.Sprintf("step %d", e.Step)
	if !e.StepSet {
		step = fmt.Sprintf("after step %d", e.Step)
	}
	return fmt.Sprintf("transport: %s %s %s, %s: %v", e.Op, dir, e.Peer, step, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// ErrClosed is returned by operations on a closed link.
var ErrClosed = errors.New("link closed")

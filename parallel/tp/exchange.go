package tp

import (
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"
)

var _ kernels.Exchanger = (*comm)(nil)

// AllToAllV sends send[p] to member p: the counts first, then the values.
func (c *comm) AllToAllV(send [][]float32) ([][]float32, error) {
	counts := make([]int, len(send))
	for p, s := range send {
		counts[p] = len(s)
	}
	return c.allToAllV(counts, send)
}

// allToAllV is AllToAllV with the counts this member announces given
// apart from its payload (tests announce wrong ones).
func (c *comm) allToAllV(counts []int, send [][]float32) ([][]float32, error) {
	if len(counts) != c.hub.size || len(send) != c.hub.size {
		err := fmt.Errorf("all-to-all-v: rank %d sends to %d ranks (%d counts), the communicator has %d", c.hub.names[c.member], len(send), len(counts), c.hub.size)
		c.hub.fate.fail(err) // its peers must not wait for it
		return nil, err
	}
	expect, err := c.hub.exchangeCounts(c.member, counts)
	if err != nil {
		return nil, err
	}
	return c.hub.exchangeRows(c.member, expect, send)
}

// AllGatherV concatenates the members' parts in member order.
func (c *comm) AllGatherV(part []float32) ([]float32, error) {
	if part == nil {
		part = []float32{}
	}
	out, err := c.hub.meet(c.member, "all-gather", part, concatParts)
	if err != nil {
		return nil, err
	}
	return out.([]float32), nil
}

func concatParts(_ int, parts []any) (any, error) {
	n := 0
	for _, p := range parts {
		n += len(p.([]float32))
	}
	out := make([]float32, 0, n)
	for _, p := range parts {
		out = append(out, p.([]float32)...)
	}
	return out, nil
}

// exchangeCounts is the all-to-all of the counts: member m gives how many
// values it will send each member and gets how many each will send it.
func (h *hub) exchangeCounts(m int, counts []int) ([]int, error) {
	out, err := h.meet(m, "all-to-all-v counts", counts, func(seq int, parts []any) (any, error) {
		for p, c := range parts {
			if n := len(c.([]int)); n != h.size {
				return nil, fmt.Errorf("all-to-all-v counts %d: rank %d gave %d counts for %d ranks", seq, h.names[p], n, h.size)
			}
		}
		return parts, nil // every member reads its column
	})
	if err != nil {
		return nil, err
	}
	all := out.([]any)
	expect := make([]int, h.size)
	for p := range all {
		expect[p] = all[p].([]int)[m]
	}
	return expect, nil
}

// rowsPart is a member's part of the values' round: what it sends, and
// what it expects from each member (their announced counts).
type rowsPart struct {
	send   [][]float32
	expect []int
}

// exchangeRows is the all-to-all of the values. Both ends are checked: a
// member's payload to p must be the count p expects from it (what it
// announced), or the round fails on every member naming both — where NCCL
// would hang or read past the buffer.
func (h *hub) exchangeRows(m int, expect []int, send [][]float32) ([][]float32, error) {
	out, err := h.meet(m, "all-to-all-v", rowsPart{send, expect}, func(seq int, parts []any) (any, error) {
		for src, sp := range parts {
			for dst, dp := range parts {
				got, want := len(sp.(rowsPart).send[dst]), dp.(rowsPart).expect[src]
				if got != want {
					return nil, fmt.Errorf("all-to-all-v %d: rank %d sent %d values to rank %d, which expected %d (the count it announced)",
						seq, h.names[src], got, h.names[dst], want)
				}
			}
		}
		return parts, nil
	})
	if err != nil {
		return nil, err
	}
	all := out.([]any)
	recv := make([][]float32, h.size)
	for p := range all {
		recv[p] = all[p].(rowsPart).send[m]
	}
	return recv, nil
}

//go:build !linux

package netdelay

import (
	"context"
	"errors"
)

// Run needs Linux's nfnetlink_queue.
func Run(ctx context.Context, cfg Config) (Stats, error) {
	return Stats{}, errors.New("netdelay: NFQUEUE needs Linux")
}

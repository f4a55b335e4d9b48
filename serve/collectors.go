package serve

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// RegisterCollector adds c (e.g. the pipeline's transport telemetry, whose
// links the head's ring creates) to the metrics /metrics serves. Its metric
// names must not clash with the server's own.
func (s *Server) RegisterCollector(c prometheus.Collector) error {
	if err := s.metrics.registry.Register(c); err != nil {
		return fmt.Errorf("serve: register a metrics collector: %w", err)
	}
	return nil
}

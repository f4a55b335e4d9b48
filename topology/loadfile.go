package topology

import (
	"fmt"
	"os"
)

// loadFile reads path and parses it with parse: a read error says what
// was being loaded, a parse error names the file.
func loadFile[T any](path, what string, parse func([]byte) (T, error)) (T, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		var zero T
		return zero, fmt.Errorf("load %s: %w", what, err)
	}
	v, err := parse(data)
	if err != nil {
		return v, fmt.Errorf("%s: %w", path, err)
	}
	return v, nil
}

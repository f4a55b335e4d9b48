package serve

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"strconv"
	"time"
)

// Config configures the OpenAI-compatible server. Field names follow vLLM's
// `vllm serve` options; RegisterFlags binds them to the same flag names.
type Config struct {
	Host string
	Port int
	// APIKey, when set, is required as "Authorization: Bearer <key>" on /v1/*,
	// /tokenize and /detokenize (/health and /metrics stay open, as in vLLM).
	APIKey string
	// ServedModelNames are the names clients may ask for; the first is reported.
	ServedModelNames []string
	// MaxModelLen caps prompt + completion tokens; 0 uses the engine's limit,
	// a larger value than the engine's is an error.
	MaxModelLen int
	// EnableAutoToolChoice allows tool_choice "auto" (vLLM's flag of the same name).
	EnableAutoToolChoice bool
	// ToolCallParser is "" (no tool parsing) or "glm45".
	ToolCallParser string
	// ReasoningParser is "" (no reasoning_content) or "glm45".
	ReasoningParser string
	// MaxNumSeqs is how many sequences the engine runs at once and MaxWaiting
	// how many may queue behind them. The CLI passes both to the engine; the
	// server also refuses (503) requests beyond their sum, so overload is an
	// error and never a hang.
	MaxNumSeqs int
	MaxWaiting int
	// ShutdownTimeout bounds graceful shutdown; streams still open after it
	// are cut.
	ShutdownTimeout time.Duration
}

// DefaultConfig returns the defaults of the flags.
func DefaultConfig() Config {
	return Config{
		Host:             "0.0.0.0",
		Port:             8000,
		ServedModelNames: []string{"glm-4.5"},
		MaxNumSeqs:       256,
		MaxWaiting:       1024,
		ShutdownTimeout:  30 * time.Second,
	}
}

// nameList is a flag accepting one or more comma-free names, repeatable.
type nameList struct {
	names *[]string
	set   bool
}

func (n *nameList) String() string {
	if n.names == nil {
		return ""
	}
	return fmt.Sprint(*n.names)
}

func (n *nameList) Set(s string) error {
	if s == "" {
		return errors.New("empty model name")
	}
	if !n.set {
		*n.names = nil
		n.set = true
	}
	*n.names = append(*n.names, s)
	return nil
}

// RegisterFlags binds c's fields to vLLM-style flags on fs; c's current
// values are the defaults.
func (c *Config) RegisterFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.Host, "host", c.Host, "address to listen on")
	fs.IntVar(&c.Port, "port", c.Port, "port to listen on")
	fs.StringVar(&c.APIKey, "api-key", c.APIKey, "require this key as a Bearer token on the API")
	fs.Var(&nameList{names: &c.ServedModelNames}, "served-model-name", "model name clients use (repeat for aliases)")
	fs.IntVar(&c.MaxModelLen, "max-model-len", c.MaxModelLen, "max prompt + completion tokens (0: the engine's limit)")
	fs.BoolVar(&c.EnableAutoToolChoice, "enable-auto-tool-choice", c.EnableAutoToolChoice, `allow tool_choice "auto"`)
	fs.StringVar(&c.ToolCallParser, "tool-call-parser", c.ToolCallParser, `tool call parser: "glm45" or empty`)
	fs.StringVar(&c.ReasoningParser, "reasoning-parser", c.ReasoningParser, `reasoning parser: "glm45" or empty`)
	fs.IntVar(&c.MaxNumSeqs, "max-num-seqs", c.MaxNumSeqs, "sequences the engine runs at once")
	fs.IntVar(&c.MaxWaiting, "max-waiting-requests", c.MaxWaiting, "requests that may wait for a free sequence slot before new ones get 503")
	fs.DurationVar(&c.ShutdownTimeout, "shutdown-timeout", c.ShutdownTimeout, "graceful shutdown limit")
}

// Validate checks c on its own (the engine's limits are checked by NewServer).
func (c *Config) Validate() error {
	if c.Port < 0 || c.Port > 65535 {
		return fmt.Errorf("--port %d out of range", c.Port)
	}
	if len(c.ServedModelNames) == 0 {
		return errors.New("--served-model-name: at least one name is needed")
	}
	if c.MaxModelLen < 0 {
		return fmt.Errorf("--max-model-len %d is negative", c.MaxModelLen)
	}
	if c.ToolCallParser != "" && c.ToolCallParser != "glm45" {
		return fmt.Errorf("--tool-call-parser %q: only glm45 is supported", c.ToolCallParser)
	}
	if c.ReasoningParser != "" && c.ReasoningParser != "glm45" {
		return fmt.Errorf("--reasoning-parser %q: only glm45 is supported", c.ReasoningParser)
	}
	if c.EnableAutoToolChoice && c.ToolCallParser == "" {
		return errors.New("--enable-auto-tool-choice needs --tool-call-parser glm45")
	}
	if c.MaxNumSeqs < 1 {
		return fmt.Errorf("--max-num-seqs %d must be at least 1", c.MaxNumSeqs)
	}
	if c.MaxWaiting < 0 {
		return fmt.Errorf("--max-waiting-requests %d is negative", c.MaxWaiting)
	}
	return nil
}

// Addr is the listen address.
func (c *Config) Addr() string {
	return net.JoinHostPort(c.Host, strconv.Itoa(c.Port))
}

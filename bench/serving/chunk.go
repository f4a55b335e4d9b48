package serving

import (
	"bytes"
	"encoding/json"
	"errors"
)

// chunk is what the benchmark needs from one streamed OpenAI chunk. Byte slices point into
// the line being parsed; parseChunk allocates nothing, so the per-token hot path stays
// allocation-free however many streams run.
type chunk struct {
	// token is true when the chunk carries generated output: completions "text", chat
	// delta "content"/"reasoning_content"/"reasoning"/"tool_calls". A chat chunk that only
	// announces the role, and an empty terminal chunk that only carries finish_reason, are
	// not tokens (vLLM's client counts both, which inflates TTFT accuracy and ITL counts).
	token bool
	// text is the raw JSON string body (still escaped) of the text or content delta.
	text []byte
	// finished is true when choices[0].finish_reason is a string.
	finished bool

	hasUsage         bool
	promptTokens     int
	completionTokens int

	// errMsg is a top-level "error" value (vLLM streams errors this way), raw JSON.
	errMsg []byte
}

var errBadJSON = errors.New("malformed JSON in stream chunk")

// parseChunk fills c from one SSE data payload.
func parseChunk(b []byte, c *chunk) error {
	*c = chunk{}
	p := &scanner{b: b}
	p.ws()
	if !p.consume('{') {
		return errBadJSON
	}
	var sawChoices bool
	var role bool
	var emptyBody bool
	err := p.object(func(key []byte) error {
		switch string(key) {
		case "choices":
			return p.array(func(i int) error {
				if i > 0 {
					return p.skip()
				}
				sawChoices = true
				var r, e bool
				err := parseChoice(p, c, &r, &e)
				role, emptyBody = r, e
				return err
			})
		case "usage":
			if p.peek() != '{' {
				return p.skip()
			}
			p.i++
			c.hasUsage = true
			return p.object(func(k []byte) error {
				switch string(k) {
				case "prompt_tokens":
					n, err := p.int()
					c.promptTokens = n
					return err
				case "completion_tokens":
					n, err := p.int()
					c.completionTokens = n
					return err
				}
				return p.skip()
			})
		case "error":
			start := p.i
			if err := p.skip(); err != nil {
				return err
			}
			if v := p.b[start:p.i]; string(v) != "null" {
				c.errMsg = v
			}
			return nil
		}
		return p.skip()
	})
	if err != nil {
		return err
	}
	if sawChoices && c.token {
		// Role-only announcements and bare finish markers carry no output.
		if emptyBody && (role || c.finished) {
			c.token = false
		}
	}
	return nil
}

// parseChoice reads choices[0]; role reports a chat delta that named a role, empty that all
// output fields present were empty strings.
func parseChoice(p *scanner, c *chunk, role, empty *bool) error {
	if p.peek() != '{' {
		return p.skip()
	}
	p.i++
	nonEmpty := false
	field := func(k []byte) error {
		switch string(k) {
		case "text", "content", "reasoning_content", "reasoning":
			if p.peek() != '"' {
				return p.skip()
			}
			s, err := p.str()
			if err != nil {
				return err
			}
			c.token = true
			if len(s) > 0 {
				nonEmpty = true
			}
			if (string(k) == "text" || string(k) == "content") && len(s) > 0 {
				c.text = s
			}
			return nil
		case "tool_calls":
			if p.peek() == 'n' {
				return p.skip()
			}
			c.token, nonEmpty = true, true
			return p.skip()
		case "role":
			*role = true
			return p.skip()
		}
		return p.skip()
	}
	err := p.object(func(k []byte) error {
		switch string(k) {
		case "delta", "message":
			if p.peek() != '{' {
				return p.skip()
			}
			p.i++
			return p.object(field)
		case "finish_reason":
			c.finished = p.peek() == '"'
			return p.skip()
		}
		return field(k)
	})
	*empty = !nonEmpty
	return err
}

// unescapeJSONString decodes the raw body of a JSON string (without quotes).
func unescapeJSONString(raw []byte) (string, error) {
	hasEscape := false
	for _, ch := range raw {
		if ch == '\\' {
			hasEscape = true
			break
		}
	}
	if !hasEscape {
		return string(raw), nil
	}
	q := make([]byte, 0, len(raw)+2)
	q = append(q, '"')
	q = append(q, raw...)
	q = append(q, '"')
	var s string
	err := json.Unmarshal(q, &s)
	return s, err
}

// scanner is a minimal allocation-free JSON reader over one value.
type scanner struct {
	b []byte
	i int
}

func (p *scanner) ws() {
	for p.i < len(p.b) {
		switch p.b[p.i] {
		case ' ', '\t', '\n', '\r':
			p.i++
		default:
			return
		}
	}
}

func (p *scanner) peek() byte {
	p.ws()
	if p.i >= len(p.b) {
		return 0
	}
	return p.b[p.i]
}

func (p *scanner) consume(ch byte) bool {
	if p.peek() == ch {
		p.i++
		return true
	}
	return false
}

// object reads members after the opening brace up to and including the closing one;
// fn must consume each value.
func (p *scanner) object(fn func(key []byte) error) error {
	if p.consume('}') {
		return nil
	}
	for {
		if p.peek() != '"' {
			return errBadJSON
		}
		key, err := p.str()
		if err != nil {
			return err
		}
		if !p.consume(':') {
			return errBadJSON
		}
		p.ws()
		if err := fn(key); err != nil {
			return err
		}
		if p.consume(',') {
			continue
		}
		if p.consume('}') {
			return nil
		}
		return errBadJSON
	}
}

// array reads a whole array value (including brackets) or null; fn must consume each element.
func (p *scanner) array(fn func(i int) error) error {
	if p.peek() == 'n' {
		return p.skip()
	}
	if !p.consume('[') {
		return errBadJSON
	}
	if p.consume(']') {
		return nil
	}
	for i := 0; ; i++ {
		p.ws()
		if err := fn(i); err != nil {
			return err
		}
		if p.consume(',') {
			continue
		}
		if p.consume(']') {
			return nil
		}
		return errBadJSON
	}
}

// str reads a string and returns its raw (escaped) body.
func (p *scanner) str() ([]byte, error) {
	if !p.consume('"') {
		return nil, errBadJSON
	}
	start := p.i
	for {
		j := bytes.IndexByte(p.b[p.i:], '"')
		if j < 0 {
			return nil, errBadJSON
		}
		end := p.i + j
		p.i = end + 1
		// The quote ends the string unless an odd number of backslashes precede it.
		bs := 0
		for k := end - 1; k >= start && p.b[k] == '\\'; k-- {
			bs++
		}
		if bs%2 == 0 {
			return p.b[start:end], nil
		}
	}
}

func (p *scanner) int() (int, error) {
	p.ws()
	if p.i < len(p.b) && p.b[p.i] == 'n' {
		return 0, p.skip()
	}
	n, digits := 0, 0
	for p.i < len(p.b) && p.b[p.i] >= '0' && p.b[p.i] <= '9' {
		n = n*10 + int(p.b[p.i]-'0')
		p.i++
		digits++
	}
	if digits == 0 {
		return 0, errBadJSON
	}
	// Tolerate "12.0" from servers that emit floats.
	if p.i < len(p.b) && (p.b[p.i] == '.' || p.b[p.i] == 'e' || p.b[p.i] == 'E') {
		return n, p.skipNumberTail()
	}
	return n, nil
}

func (p *scanner) skipNumberTail() error {
	for p.i < len(p.b) {
		switch ch := p.b[p.i]; {
		case ch >= '0' && ch <= '9', ch == '.', ch == 'e', ch == 'E', ch == '+', ch == '-':
			p.i++
		default:
			return nil
		}
	}
	return nil
}

// skip consumes any one value.
func (p *scanner) skip() error {
	switch ch := p.peek(); {
	case ch == '"':
		_, err := p.str()
		return err
	case ch == '{':
		p.i++
		return p.object(func([]byte) error { return p.skip() })
	case ch == '[':
		return p.array(func(int) error { return p.skip() })
	case ch == 't':
		return p.lit("true")
	case ch == 'f':
		return p.lit("false")
	case ch == 'n':
		return p.lit("null")
	case ch == '-' || (ch >= '0' && ch <= '9'):
		p.i++
		return p.skipNumberTail()
	}
	return errBadJSON
}

func (p *scanner) lit(s string) error {
	if len(p.b)-p.i < len(s) || string(p.b[p.i:p.i+len(s)]) != s {
		return errBadJSON
	}
	p.i += len(s)
	return nil
}

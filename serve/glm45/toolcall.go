package glm45

import (
	"bytes"
	"encoding/json"
	"strings"
	"unicode/utf8"
)

type toolState int

const (
	tsContent  toolState = iota // outside calls
	tsName                      // after <tool_call>, reading the function name
	tsRaw                       // inside a call to an unknown function: verbatim content
	tsArgs                      // between arguments
	tsKey                       // inside <arg_key>
	tsAfterKey                  // after </arg_key>, before <arg_value>
	tsValue                     // inside <arg_value>
)

// toolParser turns <tool_call> blocks of the content into tool-call deltas.
type toolParser struct {
	tools map[string]argTypes // nil: accept every name
	newID func() string

	state   toolState
	buf     string  // unprocessed input (a possible partial tag)
	content trimmer // content outside calls
	// afterCall: the content segment follows a call, so its leading
	// whitespace touches the call and is dropped.
	afterCall bool

	calls     int // calls emitted; the current one is calls-1
	types     argTypes
	nargs     int    // arguments emitted in the current call
	stray     string // non-markup text between arguments (maybe a JSON object)
	key       string
	valString bool    // the current value is streamed as a JSON string
	value     string  // buffered non-string value
	valTrim   trimmer // trims a streamed string value
	valRune   string  // an incomplete UTF-8 sequence held back from the value
}

// maxNameLen bounds how much text after <tool_call> is held back waiting
// for the end of a function name.
const maxNameLen = 256

// argTypes maps an argument name to whether its schema type is string.
type argTypes map[string]bool

func newToolParser(tools []Tool, newID func() string) *toolParser {
	if newID == nil {
		newID = NewCallID
	}
	p := &toolParser{newID: newID}
	p.content.reset(false)
	if len(tools) > 0 {
		p.tools = make(map[string]argTypes, len(tools))
		for _, t := range tools {
			p.tools[t.Name] = schemaStringArgs(t.Parameters)
		}
	}
	return p
}

// schemaStringArgs reads which properties of a JSON schema are strings.
func schemaStringArgs(params json.RawMessage) argTypes {
	var schema struct {
		Properties map[string]struct {
			Type json.RawMessage `json:"type"`
		} `json:"properties"`
	}
	types := argTypes{}
	if len(params) == 0 || json.Unmarshal(params, &schema) != nil {
		return types
	}
	for name, prop := range schema.Properties {
		var one string
		var many []string
		switch {
		case json.Unmarshal(prop.Type, &one) == nil:
			types[name] = one == "string"
		case json.Unmarshal(prop.Type, &many) == nil:
			for _, t := range many {
				if t == "string" {
					types[name] = true
				}
			}
		}
	}
	return types
}

func (p *toolParser) emitContent(d *Delta, s string) {
	d.Content += s
}

func (p *toolParser) emitArgs(d *Delta, s string) {
	if s == "" {
		return
	}
	idx := p.calls - 1
	if n := len(d.ToolCalls); n > 0 && d.ToolCalls[n-1].Index == idx {
		d.ToolCalls[n-1].Arguments += s
		return
	}
	d.ToolCalls = append(d.ToolCalls, ToolCallDelta{Index: idx, Arguments: s})
}

// feed parses text and appends what it completes to d.
func (p *toolParser) feed(text string, d *Delta) {
	p.buf += text
	for p.step(d, false) {
	}
}

// finish flushes everything held back at the end of the output.
func (p *toolParser) finish(d *Delta) {
	for p.step(d, true) {
	}
	// p.buf is now empty; close what is open.
	switch p.state {
	case tsContent, tsRaw:
		p.emitContent(d, p.content.takePending())
	case tsName:
		// Unreachable: step at end resolves the name.
	case tsValue:
		p.endValue(d)
		p.closeCall(d)
	default: // tsArgs, tsKey, tsAfterKey: a partial key has no value; drop it
		p.closeCall(d)
	}
}

// step processes p.buf in the current state. It reports whether it changed
// state and should run again; at end (final) nothing is held back.
func (p *toolParser) step(d *Delta, final bool) bool {
	hold := func(tags ...string) int {
		if final {
			return 0
		}
		return partialTagLen(p.buf, tags...)
	}
	switch p.state {
	case tsContent:
		i, _ := findTag(p.buf, ToolCallStart)
		if i < 0 {
			keep := hold(ToolCallStart)
			p.addContent(d, p.buf[:len(p.buf)-keep])
			p.buf = p.buf[len(p.buf)-keep:]
			return false
		}
		p.addContent(d, p.buf[:i])
		p.buf = p.buf[i+len(ToolCallStart):]
		p.state = tsName
		return true

	case tsName:
		// The name runs from the first non-space byte to whitespace, '<' or
		// '{' (arguments written as JSON right after the name).
		start := 0
		for start < len(p.buf) && isSpace(p.buf[start]) {
			start++
		}
		end := start
		for end < len(p.buf) && !isSpace(p.buf[end]) && p.buf[end] != '<' && p.buf[end] != '{' {
			end++
		}
		tooLong := end > maxNameLen
		if end == len(p.buf) && !final && !tooLong {
			return false // the name may continue
		}
		name := p.buf[start:end]
		argTypes, known := p.lookup(name)
		if tooLong {
			// No function name is this long: stop holding the text back.
			known = false
		}
		if !known {
			// Not a call the client can run: show it as text.
			p.emitContent(d, p.content.takePending()+ToolCallStart+p.buf[:end])
			p.buf = p.buf[end:]
			p.state = tsRaw
			return true
		}
		p.content.takePending() // whitespace before the call touches it
		p.buf = p.buf[end:]
		p.startCall(d, name, argTypes)
		return true

	case tsRaw:
		i, _ := findTag(p.buf, ToolCallEnd)
		if i < 0 {
			keep := hold(ToolCallEnd)
			p.emitContent(d, p.buf[:len(p.buf)-keep])
			p.buf = p.buf[len(p.buf)-keep:]
			return false
		}
		p.emitContent(d, p.buf[:i+len(ToolCallEnd)])
		p.buf = p.buf[i+len(ToolCallEnd):]
		p.state = tsContent
		p.content.reset(false)
		p.afterCall = false
		return true

	case tsArgs:
		i, tag := findTag(p.buf, ArgKeyStart, ToolCallEnd, ToolCallStart)
		if i < 0 {
			keep := hold(ArgKeyStart, ToolCallEnd, ToolCallStart)
			p.stray += p.buf[:len(p.buf)-keep]
			p.buf = p.buf[len(p.buf)-keep:]
			return false
		}
		p.stray += p.buf[:i]
		p.buf = p.buf[i+len(tag):]
		switch tag {
		case ArgKeyStart:
			p.key = ""
			p.state = tsKey
		default:
			p.endCallTag(d, tag)
		}
		return true

	case tsKey:
		i, tag := findTag(p.buf, ArgKeyEnd, ArgValueStart, ToolCallEnd, ToolCallStart)
		if i < 0 {
			keep := hold(ArgKeyEnd, ArgValueStart, ToolCallEnd, ToolCallStart)
			p.key += p.buf[:len(p.buf)-keep]
			p.buf = p.buf[len(p.buf)-keep:]
			return false
		}
		p.key += p.buf[:i]
		p.buf = p.buf[i+len(tag):]
		switch tag {
		case ArgKeyEnd:
			p.state = tsAfterKey
		case ArgValueStart: // forgiving: </arg_key> missing
			p.startValue(d)
		default:
			p.endCallTag(d, tag)
		}
		return true

	case tsAfterKey:
		i, tag := findTag(p.buf, ArgValueStart, ArgKeyStart, ToolCallEnd, ToolCallStart)
		if i < 0 {
			keep := hold(ArgValueStart, ArgKeyStart, ToolCallEnd, ToolCallStart)
			p.buf = p.buf[len(p.buf)-keep:] // text between key and value is noise
			return false
		}
		p.buf = p.buf[i+len(tag):]
		switch tag {
		case ArgValueStart:
			p.startValue(d)
		case ArgKeyStart: // a key without a value: replaced by the next key
			p.key = ""
			p.state = tsKey
		default:
			p.endCallTag(d, tag)
		}
		return true

	case tsValue:
		i, tag := findTag(p.buf, ArgValueEnd, ToolCallEnd)
		if i < 0 {
			keep := hold(ArgValueEnd, ToolCallEnd)
			p.addValue(d, p.buf[:len(p.buf)-keep])
			p.buf = p.buf[len(p.buf)-keep:]
			return false
		}
		p.addValue(d, p.buf[:i])
		p.buf = p.buf[i+len(tag):]
		p.endValue(d)
		if tag == ToolCallEnd { // forgiving: </arg_value> missing
			p.endCallTag(d, tag)
		} else {
			p.state = tsArgs
		}
		return true
	}
	return false
}

func (p *toolParser) lookup(name string) (argTypes, bool) {
	if name == "" {
		return nil, false
	}
	if p.tools == nil {
		return argTypes{}, true
	}
	t, ok := p.tools[name]
	return t, ok
}

func (p *toolParser) addContent(d *Delta, s string) {
	if p.afterCall {
		s = strings.TrimLeft(s, " \n\t\r\f\v")
		if s == "" {
			return
		}
		p.afterCall = false
	}
	p.emitContent(d, p.content.add(s))
}

func (p *toolParser) startCall(d *Delta, name string, types argTypes) {
	p.calls++
	p.types = types
	p.nargs = 0
	p.stray = ""
	d.ToolCalls = append(d.ToolCalls, ToolCallDelta{Index: p.calls - 1, ID: p.newID(), Name: name})
	p.state = tsArgs
}

// endCallTag handles </tool_call> or a new <tool_call> inside a call.
func (p *toolParser) endCallTag(d *Delta, tag string) {
	p.closeCall(d)
	if tag == ToolCallStart { // forgiving: </tool_call> missing before the next call
		p.state = tsName
	}
}

// closeCall ends the current call's arguments object.
func (p *toolParser) closeCall(d *Delta) {
	if p.nargs > 0 {
		p.emitArgs(d, "}")
	} else if obj := trimSpace(p.stray); len(obj) > 1 && obj[0] == '{' && json.Valid([]byte(obj)) {
		// Forgiving: the arguments were written as a JSON object.
		var b bytes.Buffer
		_ = json.Compact(&b, []byte(obj))
		p.emitArgs(d, b.String())
	} else {
		p.emitArgs(d, "{}")
	}
	p.state = tsContent
	p.content.reset(false)
	p.afterCall = true
}

func (p *toolParser) startValue(d *Delta) {
	key := trimSpace(p.key)
	sep := ", "
	if p.nargs == 0 {
		sep = "{"
	}
	p.nargs++
	p.valString = p.types[key]
	p.value, p.valRune = "", ""
	p.valTrim.reset(true)
	prefix := sep + jsonString(key) + ": "
	if p.valString {
		prefix += `"`
	}
	p.emitArgs(d, prefix)
	p.state = tsValue
}

func (p *toolParser) addValue(d *Delta, s string) {
	if !p.valString {
		p.value += s
		return
	}
	s = p.valRune + p.valTrim.add(s)
	// Hold back an incomplete UTF-8 sequence so chunks escape like the whole.
	p.valRune = ""
	if cut := incompleteRuneStart(s); cut < len(s) {
		p.valRune = s[cut:]
		s = s[:cut]
	}
	p.emitArgs(d, jsonStringBody(s))
}

// endValue closes the current value; a held incomplete UTF-8 sequence
// is escaped as it is (U+FFFD per byte).
func (p *toolParser) endValue(d *Delta) {
	if p.valString {
		p.emitArgs(d, jsonStringBody(p.valRune)+`"`)
		p.valRune = ""
		return
	}
	v := trimSpace(p.value)
	if v != "" && json.Valid([]byte(v)) {
		var b bytes.Buffer
		_ = json.Compact(&b, []byte(v))
		p.emitArgs(d, b.String())
	} else {
		p.emitArgs(d, jsonString(v))
	}
	p.value = ""
}

// incompleteRuneStart returns where a trailing incomplete UTF-8 sequence of
// s starts (len(s) when there is none).
func incompleteRuneStart(s string) int {
	for i := len(s) - 1; i >= 0 && i >= len(s)-utf8.UTFMax; i-- {
		if utf8.RuneStart(s[i]) {
			if !utf8.FullRuneInString(s[i:]) {
				return i
			}
			break
		}
	}
	return len(s)
}

// jsonString encodes s as a JSON string without HTML escaping.
func jsonString(s string) string {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s) // encoding a string cannot fail
	return strings.TrimSuffix(b.String(), "\n")
}

// jsonStringBody is jsonString without the quotes.
func jsonStringBody(s string) string {
	if s == "" {
		return ""
	}
	q := jsonString(s)
	return q[1 : len(q)-1]
}

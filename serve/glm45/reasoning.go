package glm45

// reasoningState is where the reasoning parser is in the output.
type reasoningState int

const (
	// rsStart: before anything but whitespace; a leading <think> opens reasoning.
	rsStart reasoningState = iota
	// rsReasoning: inside <think>, until </think>.
	rsReasoning
	// rsContent: everything else is content (a later <think> is literal text).
	rsContent
)

// reasoningParser splits output into reasoning and content. Only a <think>
// that starts the output (after whitespace) opens reasoning: GLM-4.5 thinks
// first or not at all, and a tag later in the answer is text about tags.
type reasoningParser struct {
	state     reasoningState
	buf       string  // unprocessed input (a possible partial tag)
	reasoning trimmer // trims the reasoning segment
	content   trimmer // drops the content's leading whitespace
}

func newReasoningParser(thinkingDisabled, startInReasoning bool) *reasoningParser {
	r := &reasoningParser{}
	r.content.reset(true)
	switch {
	case thinkingDisabled:
		r.state = rsContent
	case startInReasoning:
		r.state = rsReasoning
		r.reasoning.reset(true)
	default:
		r.state = rsStart
	}
	return r
}

// feed returns the reasoning and content text that text completes.
func (r *reasoningParser) feed(text string) (reasoning, content string) {
	r.buf += text
	for {
		switch r.state {
		case rsStart:
			i := 0
			for i < len(r.buf) && isSpace(r.buf[i]) {
				i++
			}
			rest := r.buf[i:]
			switch {
			case len(rest) >= len(ThinkStart) && rest[:len(ThinkStart)] == ThinkStart:
				r.buf = rest[len(ThinkStart):]
				r.state = rsReasoning
				r.reasoning.reset(true)
				continue
			case len(rest) < len(ThinkStart) && ThinkStart[:len(rest)] == rest:
				// Whitespace only, or a partial <think>: wait for more.
				return reasoning, content
			default:
				r.buf = rest
				r.state = rsContent
				continue
			}
		case rsReasoning:
			if i, _ := findTag(r.buf, ThinkEnd); i >= 0 {
				reasoning += r.reasoning.add(r.buf[:i])
				r.reasoning.takePending() // trailing whitespace of the reasoning
				r.buf = r.buf[i+len(ThinkEnd):]
				r.state = rsContent
				r.content.reset(true)
				continue
			}
			keep := partialTagLen(r.buf, ThinkEnd)
			reasoning += r.reasoning.add(r.buf[:len(r.buf)-keep])
			r.buf = r.buf[len(r.buf)-keep:]
			return reasoning, content
		default: // rsContent
			content += r.content.add(r.buf)
			content += r.content.takePending()
			r.buf = ""
			return reasoning, content
		}
	}
}

// finish flushes held text at the end of the output: a truncated reasoning
// block stays reasoning, a held partial tag is text.
func (r *reasoningParser) finish() (reasoning, content string) {
	switch r.state {
	case rsStart:
		// Only whitespace or a partial "<think" was seen: it is content.
		content = r.content.add(r.buf)
	case rsReasoning:
		reasoning = r.reasoning.add(r.buf)
	default:
		content = r.content.add(r.buf)
		content += r.content.takePending()
	}
	r.buf = ""
	return reasoning, content
}

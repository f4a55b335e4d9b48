package tokenizer

// StreamDecoder turns ids into text one at a time, as a model generates them.
// A UTF-8 character split across tokens is held back until it is complete, so
// no returned piece ends in half a character. The pieces of Add followed by
// Flush concatenate to Decode of the same ids.
//
// A StreamDecoder belongs to one stream; it is not safe for concurrent use.
type StreamDecoder struct {
	t           *Tokenizer
	pending     []byte
	skipSpecial bool
}

// NewStreamDecoder starts an incremental decoder; special tokens are included
// as their text, as in Decode.
func (t *Tokenizer) NewStreamDecoder() *StreamDecoder {
	return &StreamDecoder{t: t}
}

// NewStreamDecoderSkipSpecial is NewStreamDecoder leaving special tokens out,
// as DecodeSkipSpecial does.
func (t *Tokenizer) NewStreamDecoderSkipSpecial() *StreamDecoder {
	return &StreamDecoder{t: t, skipSpecial: true}
}

// Add feeds one id and returns the text it completes, possibly "". Ids outside
// the vocabulary are ignored, as in Decode.
func (d *StreamDecoder) Add(id int) string {
	if !d.t.valid(id) || (d.skipSpecial && d.t.special[id]) {
		return ""
	}
	d.pending = append(d.pending, d.t.idBytes[id]...)
	keep := incompleteTail(d.pending)
	ready := len(d.pending) - keep
	if ready == 0 {
		return ""
	}
	out := string(appendLossy(make([]byte, 0, ready), d.pending[:ready]))
	d.pending = append(d.pending[:0], d.pending[ready:]...)
	return out
}

// Flush returns whatever is held back (an unfinished character becomes
// U+FFFD) and resets the decoder for reuse.
func (d *StreamDecoder) Flush() string {
	if len(d.pending) == 0 {
		return ""
	}
	out := string(appendLossy(nil, d.pending))
	d.pending = d.pending[:0]
	return out
}

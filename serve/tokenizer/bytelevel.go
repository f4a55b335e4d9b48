package tokenizer

import (
	"unicode/utf8"
)

// byteLevel is GPT-2's reversible byte↔rune mapping used by the ByteLevel
// pre-tokenizer and decoder: printable bytes map to themselves and the rest to
// runes from U+0100 on, so every byte string becomes a string of visible runes.
type byteLevel struct {
	toRune [256]rune
	toByte [324]int16 // rune → byte, -1 where the rune is not in the alphabet
}

func newByteLevel() *byteLevel {
	bl := &byteLevel{}
	for i := range bl.toByte {
		bl.toByte[i] = -1
	}
	printable := func(b int) bool {
		return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)
	}
	next := rune(256)
	for b := 0; b < 256; b++ {
		r := rune(b)
		if !printable(b) {
			r = next
			next++
		}
		bl.toRune[b] = r
		bl.toByte[r] = int16(b)
	}
	return bl
}

// encode maps raw bytes to their byte-level token text.
func (bl *byteLevel) encode(s string) string {
	out := make([]rune, 0, len(s))
	for i := 0; i < len(s); i++ {
		out = append(out, bl.toRune[s[i]])
	}
	return string(out)
}

// decodeToken returns the bytes a token stands for. As in Hugging Face's
// ByteLevel decoder, a token containing any rune outside the byte alphabet
// (an added token such as "<|end of text|>") is taken as its own UTF-8 text.
func (bl *byteLevel) decodeToken(tok string) []byte {
	out := make([]byte, 0, len(tok))
	for _, r := range tok {
		if r >= rune(len(bl.toByte)) || bl.toByte[r] < 0 {
			return []byte(tok)
		}
		out = append(out, byte(bl.toByte[r]))
	}
	return out
}

// appendLossy appends b to dst as valid UTF-8, replacing each maximal invalid
// subpart with U+FFFD exactly as Rust's String::from_utf8_lossy does (which is
// what Hugging Face decoding produces). Go's own conversions replace each bad
// byte instead, which differs on truncated multi-byte sequences.
func appendLossy(dst []byte, b []byte) []byte {
	for len(b) > 0 {
		r, size := utf8.DecodeRune(b)
		if r != utf8.RuneError || size > 1 {
			dst = append(dst, b[:size]...)
			b = b[size:]
			continue
		}
		dst = append(dst, "\uFFFD"...)
		b = b[invalidPrefixLen(b):]
	}
	return dst
}

// invalidPrefixLen is the length of the maximal invalid subpart at the start
// of b: the longest prefix that could begin a valid sequence, at least 1.
func invalidPrefixLen(b []byte) int {
	need, lo, hi := seqShape(b[0])
	if need == 0 {
		return 1
	}
	n := 1
	for n <= need && n < len(b) {
		c := b[n]
		if n == 1 {
			if c < lo || c > hi {
				break
			}
		} else if c < 0x80 || c > 0xBF {
			break
		}
		n++
	}
	return n
}

// seqShape gives, for a lead byte, how many continuation bytes follow and the
// allowed range of the first one; need is 0 for bytes that cannot lead.
func seqShape(lead byte) (need int, lo, hi byte) {
	switch {
	case lead >= 0xC2 && lead <= 0xDF:
		return 1, 0x80, 0xBF
	case lead == 0xE0:
		return 2, 0xA0, 0xBF
	case lead == 0xED:
		return 2, 0x80, 0x9F
	case lead >= 0xE1 && lead <= 0xEF:
		return 2, 0x80, 0xBF
	case lead == 0xF0:
		return 3, 0x90, 0xBF
	case lead == 0xF4:
		return 3, 0x80, 0x8F
	case lead >= 0xF1 && lead <= 0xF3:
		return 3, 0x80, 0xBF
	}
	return 0, 0, 0
}

// incompleteTail is the length of a trailing sequence of b that is a valid
// but unfinished UTF-8 character (0 if there is none): those bytes may still be
// completed by the next token, so a streaming decoder holds them back.
func incompleteTail(b []byte) int {
	for back := 1; back <= 3 && back <= len(b); back++ {
		start := len(b) - back
		need, _, _ := seqShape(b[start])
		if need == 0 {
			if b[start] >= 0x80 && b[start] <= 0xBF {
				continue // continuation byte: the lead may be further back
			}
			return 0
		}
		if back <= need && invalidPrefixLen(b[start:]) == back {
			return back
		}
		return 0
	}
	return 0
}

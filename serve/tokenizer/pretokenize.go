package tokenizer

import (
	"sync"
	"unicode"
	"unicode/utf8"
)

// glm45SplitPattern is the Split pre-tokenizer regex of GLM-4.5's
// tokenizer.json. Go's regexp cannot express its `(?!\S)` lookahead, so
// nextPiece implements the same leftmost-first, backtracking semantics by hand.
const glm45SplitPattern = `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`

// Rune classes of the pattern. \s is Oniguruma's Unicode \s (White_Space),
// which is exactly unicode.IsSpace; \p{L} and \p{N} are the general categories.
const (
	classOther = iota // none of the below: punctuation, symbols, marks, invalid bytes
	classLetter
	classNumber
	classSpace // \s other than \r and \n
	classNewline
)

var asciiClass = func() (t [utf8.RuneSelf]uint8) {
	for c := 0; c < utf8.RuneSelf; c++ {
		t[c] = classOf(rune(c))
	}
	return t
}()

// bmpClass caches classOf for the Basic Multilingual Plane (64 KiB, built on
// first use): the unicode range tables cost a binary search per rune.
var bmpClass = sync.OnceValue(func() *[0x10000]uint8 {
	t := new([0x10000]uint8)
	for r := range t {
		t[r] = classOf(rune(r))
	}
	return t
})

func classOf(r rune) uint8 {
	switch {
	case r == '\r' || r == '\n':
		return classNewline
	case unicode.IsSpace(r):
		return classSpace
	case unicode.IsLetter(r):
		return classLetter
	case unicode.IsNumber(r):
		return classNumber
	}
	return classUnicode16(r)
}

// runeAt decodes the rune at s[i] and its class; invalid UTF-8 counts as one
// byte of class other (byte-level BPE still encodes it losslessly).
func runeAt(s string, i int, bmp *[0x10000]uint8) (r rune, size int, class uint8) {
	if c := s[i]; c < utf8.RuneSelf {
		return rune(c), 1, asciiClass[c]
	}
	r, size = utf8.DecodeRuneInString(s[i:])
	if r == utf8.RuneError && size == 1 {
		return r, 1, classOther
	}
	if r < 0x10000 {
		return r, size, bmp[r]
	}
	return r, size, classOf(r)
}

// splitPieces calls emit for each piece of s as GLM-4.5's Split pre-tokenizer
// (behavior Isolated) cuts it. Every rune is covered by some alternative, so
// the pieces are contiguous and concatenate back to s.
func splitPieces(s string, emit func(piece string)) {
	bmp := bmpClass()
	for i := 0; i < len(s); {
		end := nextPiece(s, i, bmp)
		emit(s[i:end])
		i = end
	}
}

// nextPiece returns the end of the regex match that starts at s[i]. The
// alternatives are tried in the pattern's order, as Oniguruma does.
func nextPiece(s string, i int, bmp *[0x10000]uint8) int {
	r0, w0, c0 := runeAt(s, i, bmp)

	// (?i:'s|'t|'re|'ve|'m|'ll|'d)
	if r0 == '\'' {
		if end := contraction(s, i+1); end > 0 {
			return end
		}
	}

	// [^\r\n\p{L}\p{N}]?\p{L}+
	if c0 == classLetter {
		return skipClass(s, i+w0, classLetter, bmp)
	}
	if c0 == classOther || c0 == classSpace {
		if j := i + w0; j < len(s) {
			if _, w1, c1 := runeAt(s, j, bmp); c1 == classLetter {
				return skipClass(s, j+w1, classLetter, bmp)
			}
		}
	}

	// \p{N}{1,3}
	if c0 == classNumber {
		j := i + w0
		for n := 1; n < 3 && j < len(s); n++ {
			_, w, c := runeAt(s, j, bmp)
			if c != classNumber {
				break
			}
			j += w
		}
		return j
	}

	// ` ?[^\s\p{L}\p{N}]+[\r\n]*`
	start := -1
	if c0 == classOther {
		start = i
	} else if r0 == ' ' && i+1 < len(s) {
		if _, _, c1 := runeAt(s, i+1, bmp); c1 == classOther {
			start = i + 1
		}
	}
	if start >= 0 {
		j := skipClass(s, start, classOther, bmp)
		return skipClass(s, j, classNewline, bmp)
	}

	// Only whitespace is left. Scan its run once for the three remaining
	// alternatives.
	j, lastNewline, lastStart := i, -1, i
	for j < len(s) {
		_, w, c := runeAt(s, j, bmp)
		if c != classSpace && c != classNewline {
			break
		}
		if c == classNewline {
			lastNewline = j
		}
		lastStart = j
		j += w
	}
	// \s*[\r\n]+ : \s* backs off to the last newline of the run, which
	// [\r\n]+ then takes (the run has no newline after it).
	if lastNewline >= 0 {
		return lastNewline + 1
	}
	// \s+(?!\S) : the whole run at the end of the text, otherwise all but its
	// last rune (which is followed by whitespace, so the lookahead holds).
	if j == len(s) {
		return j
	}
	if lastStart > i {
		return lastStart
	}
	// \s+
	return j
}

// contraction matches the letters after an apostrophe at s[j:], returning the
// end of the match or 0. Case-insensitive as Oniguruma folds it: ſ (U+017F)
// folds to s.
func contraction(s string, j int) int {
	if j >= len(s) {
		return 0
	}
	r1, w1 := utf8.DecodeRuneInString(s[j:])
	second := func(want byte) int {
		k := j + w1
		if k < len(s) && (s[k] == want || s[k] == want-'a'+'A') {
			return k + 1
		}
		return 0
	}
	switch r1 {
	case 's', 'S', 'ſ', 't', 'T', 'm', 'M', 'd', 'D':
		return j + w1
	case 'r', 'R', 'v', 'V':
		return second('e')
	case 'l', 'L':
		return second('l')
	}
	return 0
}

// skipClass advances past runes of class c.
func skipClass(s string, j int, c uint8, bmp *[0x10000]uint8) int {
	for j < len(s) {
		_, w, cj := runeAt(s, j, bmp)
		if cj != c {
			break
		}
		j += w
	}
	return j
}

package node

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/libp2p/go-libp2p/core/pnet"
)

const (
	clusterKeyHeader = "/key/swarm/psk/1.0.0/"
	maxClusterKeyLen = 4096 // a key file is 88 bytes
)

// LoadClusterKey reads a libp2p private-network key (the go-ipfs swarm.key
// format: "/key/swarm/psk/1.0.0/", "/base16/", 64 hex digits). Every error
// names the file and says what is wrong with it. Like ssh with a private
// key, it refuses a file that group or others may read or write: the key is
// all it takes to join the cluster.
func LoadClusterKey(path string) (pnet.PSK, error) {
	fail := func(format string, args ...any) (pnet.PSK, error) {
		return nil, fmt.Errorf("cluster key file %s: "+format, append([]any{path}, args...)...)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("cluster key file: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("cluster key file: %w", err)
	}
	if !st.Mode().IsRegular() {
		return fail("not a regular file (%s)", st.Mode().Type())
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return fail("mode %04o lets others read or change the key that admits hosts to the cluster; run chmod 600 %s", perm, path)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxClusterKeyLen+1))
	if err != nil {
		return fail("%v", err)
	}
	if len(b) > maxClusterKeyLen {
		return fail("larger than %d bytes: not a cluster key file", maxClusterKeyLen)
	}
	return parseClusterKey(path, b)
}

// parseClusterKey checks the file's three lines with messages that say
// which line is wrong, then decodes it with libp2p's decoder.
func parseClusterKey(path string, b []byte) (pnet.PSK, error) {
	fail := func(format string, args ...any) (pnet.PSK, error) {
		return nil, fmt.Errorf("cluster key file %s: "+format+"; create a key with 'glmtopo node cluster-key --out FILE'", append([]any{path}, args...)...)
	}
	text := strings.ReplaceAll(string(b), "\r\n", "\n")
	lines := strings.Split(strings.TrimRight(text, "\n \t"), "\n")
	switch {
	case strings.TrimSpace(text) == "":
		return fail("the file is empty")
	case strings.TrimSpace(lines[0]) != clusterKeyHeader:
		return fail("line 1 is %q, want %q (not a cluster key file)", clip(lines[0]), clusterKeyHeader)
	case len(lines) < 3:
		return fail("the file ends after %d line(s); want 3: %s, an encoding (/base16/) and the key", len(lines), clusterKeyHeader)
	case len(lines) > 3:
		return fail("%d lines; want 3: %s, an encoding (/base16/) and the key", len(lines), clusterKeyHeader)
	}
	enc, key := strings.TrimSpace(lines[1]), strings.TrimSpace(lines[2])
	switch enc {
	case "/base16/":
		if len(key) != 64 {
			return fail("line 3 has %d characters; want the key as 64 hex digits", len(key))
		}
		if _, err := hex.DecodeString(key); err != nil {
			i := strings.IndexFunc(key, func(r rune) bool { return !strings.ContainsRune("0123456789abcdefABCDEF", r) })
			return fail("line 3 is not hexadecimal (character %d is %q)", i+1, key[i:i+1])
		}
	case "/base64/":
	default:
		return fail("line 2 is %q; want the encoding /base16/", clip(enc))
	}
	psk, err := pnet.DecodeV1PSK(bytes.NewReader([]byte(clusterKeyHeader + "\n" + enc + "\n" + key + "\n")))
	if err != nil {
		return fail("%v", err)
	}
	if len(psk) != 32 {
		return fail("the key is %d bytes; want 32", len(psk))
	}
	return psk, nil
}

// clip shortens a line for an error message.
func clip(s string) string {
	if len(s) > 40 {
		return s[:40] + "…"
	}
	return s
}

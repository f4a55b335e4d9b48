package node

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Every malformed key file gets an error that names the file and says what
// is wrong, never a bare "EOF" or a hex decoder's message about U+000A.
func TestClusterKeyFileErrors(t *testing.T) {
	dir := t.TempDir()
	good, err := NewClusterKey()
	if err != nil {
		t.Fatal(err)
	}
	hexKey := strings.Repeat("ab", 32)
	cases := []struct {
		name string
		body string
		mode os.FileMode
		want string
	}{
		{"empty", "", 0o600, "the file is empty"},
		{"header only", clusterKeyHeader + "\n", 0o600, "ends after 1 line"},
		{"no key line", clusterKeyHeader + "\n/base16/\n", 0o600, "ends after 2 line"},
		{"key split over lines", clusterKeyHeader + "\n/base16/\n" + hexKey[:32] + "\n" + hexKey[32:] + "\n", 0o600, "4 lines"},
		{"short key", clusterKeyHeader + "\n/base16/\nabcd\n", 0o600, "line 3 has 4 characters"},
		{"not hex", clusterKeyHeader + "\n/base16/\n" + strings.Repeat("zz", 32) + "\n", 0o600, "line 3 is not hexadecimal"},
		{"bad encoding", clusterKeyHeader + "\n/base32/\n" + hexKey + "\n", 0o600, `line 2 is "/base32/"`},
		{"world readable", string(good), 0o644, "chmod 600"},
		{"group writable", string(good), 0o620, "mode 0620"},
	}
	for _, tc := range cases {
		p := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-"))
		if err := os.WriteFile(p, []byte(tc.body), tc.mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, tc.mode); err != nil { // umask must not hide the case
			t.Fatal(err)
		}
		_, err := LoadClusterKey(p)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), p) {
			t.Errorf("%s: err %v; want one naming %s and saying %q", tc.name, err, p, tc.want)
			continue
		}
		for _, vague := range []string{"EOF", "U+000A", "encoding/hex"} {
			if strings.Contains(err.Error(), vague) {
				t.Errorf("%s: err %q says %q", tc.name, err, vague)
			}
		}
	}
	crlf := filepath.Join(dir, "crlf")
	os.WriteFile(crlf, []byte(strings.ReplaceAll(string(good), "\n", "\r\n")), 0o600)
	if _, err := LoadClusterKey(crlf); err != nil {
		t.Errorf("a key file with CRLF line ends: %v", err)
	}
	if _, err := LoadClusterKey(filepath.Join(dir, "missing")); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("missing file: %v", err)
	}
}

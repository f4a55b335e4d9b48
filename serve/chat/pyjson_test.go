package chat

import (
	"encoding/json"
	"testing"
)

// TestPythonNumber: expected values are Python's json.dumps(json.loads(lit)).
func TestPythonNumber(t *testing.T) {
	tests := []struct{ lit, want string }{
		{"0", "0"},
		{"-0", "0"},
		{"10", "10"},
		{"1.0", "1.0"},
		{"-0.0", "-0.0"},
		{"0.1", "0.1"},
		{"1e16", "1e+16"},
		{"1e15", "1000000000000000.0"},
		{"123456789012345678", "123456789012345678"},
		{"1.5e-7", "1.5e-07"},
		{"0.0001", "0.0001"},
		{"0.00001", "1e-05"},
		{"1E400", "Infinity"},
		{"-1e400", "-Infinity"},
		{"2.5e-320", "2.5e-320"},
		{"1.7976931348623157e308", "1.7976931348623157e+308"},
		{"5e-324", "5e-324"},
		{"100000000000000000000000", "100000000000000000000000"},
		{"3.14159", "3.14159"},
		{"1e-4", "0.0001"},
		{"9.999999999999999e15", "1e+16"},
		{"1e+2", "100.0"},
		{"-12.50", "-12.5"},
		{"0.30000000000000004", "0.30000000000000004"},
		{"123456789.123456789", "123456789.12345679"},
	}
	for _, tt := range tests {
		if got := pythonNumber(tt.lit); got != tt.want {
			t.Errorf("pythonNumber(%s) = %s, want %s", tt.lit, got, tt.want)
		}
	}
}

func TestPythonJSON(t *testing.T) {
	tests := []struct{ in, want string }{
		{`{}`, `{}`},
		{`[]`, `[]`},
		{`{"b":1,"a":[true,false,null],"c":{"d":"e"}}`, `{"b": 1, "a": [true, false, null], "c": {"d": "e"}}`},
		{`"<&>\u2028é\u0000\u001f\u007f\b\f"`, "\"<&>\u2028é\\u0000\\u001f\u007f\\b\\f\""},
		{`{"k":1,"k":2,"j":3}`, `{"k": 2, "j": 3}`},
	}
	for _, tt := range tests {
		v, err := parseJSON([]byte(tt.in))
		if err != nil {
			t.Fatalf("parseJSON(%s): %v", tt.in, err)
		}
		if got := v.python(); got != tt.want {
			t.Errorf("python(%s) = %s, want %s", tt.in, got, tt.want)
		}
	}
	for _, bad := range []string{``, `{`, `{"a"}`, `[1,]`, `{"a":1}}`, `nul`} {
		if _, err := parseJSON([]byte(bad)); err == nil {
			t.Errorf("parseJSON(%q) succeeded", bad)
		}
	}
}

// FuzzRender: any decodable request renders or fails with an error, never a
// panic.
func FuzzRender(f *testing.F) {
	f.Add(`[{"role":"user","content":"hi"}]`, `[]`)
	f.Add(`[{"role":"assistant","content":"<think>a</think>b","tool_calls":[{"function":{"name":"f","arguments":"{\"a\":[1,{}]}"}}]},{"role":"tool","content":"r"}]`,
		`[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]`)
	f.Fuzz(func(t *testing.T, msgsJSON, toolsJSON string) {
		var msgs []Message
		var tools []Tool
		if json.Unmarshal([]byte(msgsJSON), &msgs) != nil || json.Unmarshal([]byte(toolsJSON), &tools) != nil {
			return
		}
		no := false
		_, _ = Render(msgs, tools, Options{AddGenerationPrompt: true, EnableThinking: &no})
	})
}

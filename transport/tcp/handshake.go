package tcp

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// The handshake authenticates both ends with the cluster key before a single
// frame byte moves. A dialer without the key receives a random nonce and a
// MAC over it and the transcript, nothing else (not even the listener's
// name); a listener without the key receives only the dialer's hello.
//
//	dialer → listener  hello: "GLTH" | version | flags | session id (16) | name len | name | nonce (32)
//	listener → dialer  challenge: flags | nonce (32) | HMAC(K, "L" | hello | flags | nonce)
//	dialer → listener  HMAC(K, "D" | hello | flags | nonce)
//	listener → dialer  accepted byte | name len | name | HMAC(K, "N" | hello | flags | nonce | name)
//
// The transcript binds the session, the direction and the dialer's name; the
// frame MAC key (when frames carry MACs) is HMAC(K, "F" | transcript).
const (
	helloMagic   = "GLTH"
	protoVersion = 1
	nonceBytes   = 32
	macBytes     = sha256.Size
	maxNameBytes = 64

	flagFrameMAC   = 1 // frames on this connection carry an HMAC-SHA256
	flagToDialer   = 2 // this connection carries listener → dialer frames
	acceptedByte   = 0xA5
	sessionIDBytes = 16
)

// ErrAuth means the peer did not prove that it holds the cluster key (or
// spoke another protocol).
var ErrAuth = errors.New("authentication failed (wrong or missing cluster key?)")

type handshakeResult struct {
	peerName string
	session  [sessionIDBytes]byte
	toDialer bool
	frameMAC bool
	macKey   []byte
}

func mac(key []byte, label string, parts ...[]byte) []byte {
	h := hmac.New(sha256.New, key)
	h.Write([]byte(label))
	for _, p := range parts {
		h.Write(p)
	}
	return h.Sum(nil)
}

func appendName(b []byte, name string) []byte {
	b = append(b, byte(len(name)))
	return append(b, name...)
}

func checkName(name string) error {
	if len(name) == 0 || len(name) > maxNameBytes {
		return fmt.Errorf("endpoint name %q: want 1…%d bytes", name, maxNameBytes)
	}
	return nil
}

// dialHandshake runs the dialer's side on c (its deadline already set).
func dialHandshake(c net.Conn, key []byte, name string, session [sessionIDBytes]byte, toDialer, frameMAC bool) (handshakeResult, error) {
	var flags byte
	if frameMAC {
		flags |= flagFrameMAC
	}
	if toDialer {
		flags |= flagToDialer
	}
	hello := append([]byte(helloMagic), protoVersion, flags)
	hello = append(hello, session[:]...)
	hello = appendName(hello, name)
	nonce := make([]byte, nonceBytes)
	rand.Read(nonce)
	hello = append(hello, nonce...)
	if _, err := c.Write(hello); err != nil {
		return handshakeResult{}, fmt.Errorf("send hello: %w", err)
	}
	challenge := make([]byte, 1+nonceBytes+macBytes)
	if _, err := io.ReadFull(c, challenge); err != nil {
		return handshakeResult{}, fmt.Errorf("read challenge: %w (peer refused us: wrong cluster key?)", err)
	}
	reply, proof := challenge[:1+nonceBytes], challenge[1+nonceBytes:]
	if !hmac.Equal(proof, mac(key, "L", hello, reply)) {
		return handshakeResult{}, fmt.Errorf("%w: the listener's proof does not match our key", ErrAuth)
	}
	if _, err := c.Write(mac(key, "D", hello, reply)); err != nil {
		return handshakeResult{}, fmt.Errorf("send proof: %w", err)
	}
	var head [2]byte
	if _, err := io.ReadFull(c, head[:]); err != nil || head[0] != acceptedByte {
		return handshakeResult{}, fmt.Errorf("%w: the listener did not accept our proof (%v)", ErrAuth, err)
	}
	n := int(head[1])
	if n == 0 || n > maxNameBytes {
		return handshakeResult{}, fmt.Errorf("%w: the listener names a %d-byte peer", ErrAuth, n)
	}
	rest := make([]byte, n+macBytes)
	if _, err := io.ReadFull(c, rest); err != nil {
		return handshakeResult{}, fmt.Errorf("read the listener's name: %w", err)
	}
	peer := rest[:n]
	if !hmac.Equal(rest[n:], mac(key, "N", hello, reply, peer)) {
		return handshakeResult{}, fmt.Errorf("%w: the listener's name is not authenticated", ErrAuth)
	}
	return handshakeResult{
		peerName: string(peer), session: session, toDialer: toDialer,
		frameMAC: reply[0]&flagFrameMAC != 0, macKey: mac(key, "F", hello, reply),
	}, nil
}

// acceptHandshake runs the listener's side on c (its deadline already set).
func acceptHandshake(c net.Conn, key []byte, name string, wantMAC bool) (handshakeResult, error) {
	fixed := make([]byte, len(helloMagic)+2+sessionIDBytes+1)
	if _, err := io.ReadFull(c, fixed); err != nil {
		return handshakeResult{}, fmt.Errorf("read hello: %w", err)
	}
	if string(fixed[:4]) != helloMagic || fixed[4] != protoVersion {
		return handshakeResult{}, fmt.Errorf("%w: not a glmtopo transport hello (version %d)", ErrAuth, fixed[4])
	}
	n := int(fixed[len(fixed)-1])
	if n == 0 || n > maxNameBytes {
		return handshakeResult{}, fmt.Errorf("%w: hello names a %d-byte peer", ErrAuth, n)
	}
	rest := make([]byte, n+nonceBytes)
	if _, err := io.ReadFull(c, rest); err != nil {
		return handshakeResult{}, fmt.Errorf("read hello: %w", err)
	}
	hello := append(fixed, rest...)
	flags := fixed[5]
	frameMAC := wantMAC || flags&flagFrameMAC != 0
	reply := make([]byte, 1, 1+nonceBytes)
	if frameMAC {
		reply[0] = flagFrameMAC
	}
	nonce := make([]byte, nonceBytes)
	rand.Read(nonce)
	reply = append(reply, nonce...)
	if _, err := c.Write(append(append([]byte(nil), reply...), mac(key, "L", hello, reply)...)); err != nil {
		return handshakeResult{}, fmt.Errorf("send challenge: %w", err)
	}
	proof := make([]byte, macBytes)
	if _, err := io.ReadFull(c, proof); err != nil {
		return handshakeResult{}, fmt.Errorf("%w: no proof from the dialer: %v", ErrAuth, err)
	}
	if !hmac.Equal(proof, mac(key, "D", hello, reply)) {
		return handshakeResult{}, fmt.Errorf("%w: the dialer's proof does not match our key", ErrAuth)
	}
	accept := appendName([]byte{acceptedByte}, name)
	accept = append(accept, mac(key, "N", hello, reply, []byte(name))...)
	if _, err := c.Write(accept); err != nil {
		return handshakeResult{}, fmt.Errorf("send accept: %w", err)
	}
	var r handshakeResult
	r.peerName = string(rest[:n])
	copy(r.session[:], fixed[6:6+sessionIDBytes])
	r.toDialer = flags&flagToDialer != 0
	r.frameMAC = frameMAC
	r.macKey = mac(key, "F", hello, reply)
	return r, nil
}

// deadlineFor bounds a handshake by the context's deadline and timeout.
func deadlineFor(ctxDeadline time.Time, ok bool, timeout time.Duration) time.Time {
	d := time.Now().Add(timeout)
	if ok && ctxDeadline.Before(d) {
		return ctxDeadline
	}
	return d
}

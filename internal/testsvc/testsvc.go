// Package testsvc gives tests the local services they need (RabbitMQ, NATS,
// Redis, ...) and unique names to isolate what they create there.
//
// A test calls Require first: when the service is not listening the test is
// skipped with a hint to start it (`make services`), unless
// STELE_REQUIRE_SERVICES is set (CI sets it), then the test fails.
package testsvc

import (
	"crypto/rand"
	"encoding/hex"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// DialTimeout is how long Require waits for a service to accept a connection.
const DialTimeout = time.Second

// Required reports whether a missing service fails tests instead of skipping
// them.
func Required() bool { return os.Getenv("STELE_REQUIRE_SERVICES") != "" }

// Require dials addr (host:port) and, when nothing accepts the connection
// within DialTimeout, skips the test, or fails it when STELE_REQUIRE_SERVICES
// is set. name says which service it is in the message.
func Require(t testing.TB, name, addr string) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, DialTimeout)
	if err == nil {
		_ = conn.Close()
		return
	}
	Missing(t, name+" is not listening on "+addr+" ("+err.Error()+"); start it with `make services`")
}

// Missing reports that something the test needs is not there: the test
// fails when STELE_REQUIRE_SERVICES is set (CI), and is skipped otherwise.
// Every test that needs a service or a program goes through here.
func Missing(t testing.TB, msg string) {
	t.Helper()
	if Required() {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// Binary returns the path of program, looked up on PATH and then in dirs
// (system directories such as /usr/sbin are not always on a user's PATH),
// or reports it Missing with hint.
func Binary(t testing.TB, program, hint string, dirs ...string) string {
	t.Helper()
	if p, err := exec.LookPath(program); err == nil {
		return p
	}
	for _, d := range dirs {
		if p, err := exec.LookPath(filepath.Join(d, program)); err == nil {
			return p
		}
	}
	Missing(t, program+" is not installed ("+hint+")")
	return ""
}

// Name returns prefix followed by 12 random lowercase hex digits, a name no
// other test (in this or another process) uses: a topic, a consumer group, a
// queue. The result is lowercase and contains only [a-z0-9._-] when prefix
// does.
func Name(prefix string) string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return strings.ToLower(prefix) + hex.EncodeToString(b)
}

// The brokers' URLs in tests: STELE_AMQP_URL, STELE_NATS_URL and
// STELE_REDIS_URL, or the local defaults.
var (
	AMQPURL  = env("STELE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
	NATSURL  = env("STELE_NATS_URL", "nats://127.0.0.1:4222")
	RedisURL = env("STELE_REDIS_URL", "redis://127.0.0.1:6379/0")
)

func env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// HostPort is the host:port of a service URL, for Require.
func HostPort(u string) string {
	_, rest, _ := strings.Cut(u, "://")
	if _, after, ok := strings.Cut(rest, "@"); ok {
		rest = after
	}
	host, _, _ := strings.Cut(rest, "/")
	return host
}

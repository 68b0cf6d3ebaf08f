package testsvc

import (
	"net"
	"regexp"
	"testing"

	"go.uber.org/goleak"
)

func TestName(t *testing.T) {
	valid := regexp.MustCompile(`^orders\.[0-9a-f]{12}$`)
	seen := map[string]bool{}
	for range 100 {
		n := Name("Orders.")
		if !valid.MatchString(n) {
			t.Fatalf("Name(%q) = %q, want lowercase prefix and 12 hex digits", "Orders.", n)
		}
		if seen[n] {
			t.Fatalf("Name returned %q twice", n)
		}
		seen[n] = true
	}
}

func TestRequireListening(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	Require(t, "test listener", l.Addr().String()) // must neither skip nor fail
}

func TestRequireMissing(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens there any more

	t.Setenv("STELE_REQUIRE_SERVICES", "")
	var r recorder
	func() {
		defer func() { _ = recover() }() // recorder panics to stop like Skip/Fatal do
		Require(&r, "ghost", addr)
	}()
	if !r.skipped || r.failed {
		t.Fatalf("without STELE_REQUIRE_SERVICES: skipped=%v failed=%v, want a skip", r.skipped, r.failed)
	}

	t.Setenv("STELE_REQUIRE_SERVICES", "1")
	r = recorder{}
	func() {
		defer func() { _ = recover() }()
		Require(&r, "ghost", addr)
	}()
	if r.skipped || !r.failed {
		t.Fatalf("with STELE_REQUIRE_SERVICES: skipped=%v failed=%v, want a failure", r.skipped, r.failed)
	}
	if want := regexp.MustCompile(`ghost is not listening on .*make services`); !want.MatchString(r.msg) {
		t.Fatalf("message %q does not name the service and how to start it", r.msg)
	}
}

// recorder is a testing.TB that records Skip and Fatal instead of stopping
// the test.
type recorder struct {
	testing.TB
	skipped, failed bool
	msg             string
}

func (r *recorder) Helper() {}
func (r *recorder) Skip(args ...any) {
	r.skipped, r.msg = true, args[0].(string)
	panic("skip")
}
func (r *recorder) Fatal(args ...any) {
	r.failed, r.msg = true, args[0].(string)
	panic("fatal")
}

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// Package wait lets tests wait for a condition with a deadline instead of
// sleeping a fixed time, which turns flaky on a loaded machine.
package wait

import (
	"testing"
	"time"
)

// Timeout is how long Until waits before failing the test.
const Timeout = 30 * time.Second

// Until polls cond every few milliseconds until it holds, and fails the test
// if it does not within Timeout. what names the condition in the failure.
func Until(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(Timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", Timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

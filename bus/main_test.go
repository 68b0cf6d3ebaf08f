package bus_test

import (
	"testing"

	"github.com/stele-dev/stele/internal/testdb"
)

// TestMain closes the shared database pools and fails the run if a test left
// a goroutine behind: every router, requester and pub/sub must be closed.
func TestMain(m *testing.M) { testdb.VerifyMain(m) }

// Package eventstoretest is the conformance suite of eventstore.Store. A
// behaviour of the store is specified here once, and every backend runs it:
//
//	func TestConformance(t *testing.T) {
//		eventstoretest.Run(t, eventstoretest.Backend{NewStore: ..., Begin: ...})
//	}
package eventstoretest

import (
	"context"
	"fmt"
	"testing"

	"github.com/stele-dev/stele/eventstore"
)

// Backend is what the suite needs from a backend under test.
type Backend struct {
	// NewStore returns an empty store of its own for one test, cleaned up by
	// t.Cleanup.
	NewStore func(t *testing.T) eventstore.Store
	// Begin starts a transaction on s (pgstore: a *sql.Tx used with
	// AppendTx; memstore: Store.Begin).
	Begin func(t *testing.T, s eventstore.Store) Tx
}

// Tx is a transaction the suite appends through.
type Tx interface {
	Append(ctx context.Context, streamID string, expected eventstore.ExpectedVersion, events []eventstore.EventData) (eventstore.AppendResult, error)
	Commit() error
	Rollback() error
}

// Run runs the whole suite as subtests of t.
func Run(t *testing.T, b Backend) {
	tests := []struct {
		name string
		fn   func(*testing.T, Backend)
	}{
		{"AppendAndReadBack", testAppendAndReadBack},
		{"ExpectedVersions", testExpectedVersions},
		{"AtomicBatch", testAtomicBatch},
		{"ConcurrentRacers", testConcurrentRacers},
		{"ConcurrentAnyAppendsToOneStream", testConcurrentAnyAppends},
		{"IdempotentRetry", testIdempotentRetry},
		{"BadInputWritesNothing", testBadInput},
		{"ReadStreamPages", testReadStreamPages},
		{"ReadAllCheckpointCategoryAndTime", testReadAll},
		{"ListStreams", testListStreams},
		{"SubscribersSeeWhatReadAllReturns", testSubscribers},
		{"OutOfOrderCommits", testOutOfOrderCommits},
		{"PerStreamInversion", testPerStreamInversion},
		{"PerStreamOrderUnderEarlyTransactionIDs", testEarlyXIDStress},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { tc.fn(t, b) })
	}
}

// Ev makes an event of type typ whose data is a small JSON document.
func Ev(typ string, n int) eventstore.EventData {
	return eventstore.EventData{Type: typ, Data: fmt.Appendf(nil, `{"n":%d}`, n)}
}

// Evs makes count events of type typ.
func Evs(typ string, count int) []eventstore.EventData {
	out := make([]eventstore.EventData, count)
	for i := range out {
		out[i] = Ev(typ, i)
	}
	return out
}

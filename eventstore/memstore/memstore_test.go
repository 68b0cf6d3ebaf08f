package memstore_test

import (
	"context"
	"testing"

	"go.uber.org/goleak"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/eventstoretest"
	"github.com/stele-dev/stele/eventstore/memstore"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestConformance(t *testing.T) {
	eventstoretest.Run(t, eventstoretest.Backend{
		NewStore: func(t *testing.T) eventstore.Store { return memstore.New(nil) },
		Begin: func(t *testing.T, s eventstore.Store) eventstoretest.Tx {
			return memTx{s.(*memstore.Store).Begin()}
		},
	})
}

type memTx struct{ *memstore.Tx }

func (tx memTx) Append(ctx context.Context, stream string, exp eventstore.ExpectedVersion, evs []eventstore.EventData) (eventstore.AppendResult, error) {
	return tx.Tx.Append(ctx, stream, exp, evs)
}

func BenchmarkStore(b *testing.B) {
	eventstoretest.Bench(b, func(b *testing.B) eventstore.Store { return memstore.New(nil) })
}

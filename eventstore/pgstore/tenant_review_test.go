package pgstore_test

import (
	"context"
	"errors"
	"testing"

	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/eventstore/eventstoretest"
	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/tenanttest"
	"github.com/stele-dev/stele/internal/testdb"
)

// TestTenantAppendTxWithAnotherTenantsEventID: AppendTx of a bound store,
// under row-level security, with an event id another tenant holds is an
// idempotency mismatch, not a retryable error that no retry can clear.
func TestTenantAppendTxWithAnotherTenantsEventID(t *testing.T) {
	forEachDriver(t, func(t *testing.T, db *sqlx.DB) {
		ctx := context.Background()
		tn := tenanttest.New(t, db)
		tn.Enable(t)
		acme, globex := tn.Tenant(t, "acme"), tn.Tenant(t, "globex")
		evs := eventstoretest.Evs("placed", 1)
		evs[0].ID = uuid.New()
		if _, err := acme.Append(ctx, "order-1", eventstore.NoStream, evs); err != nil {
			t.Fatal(err)
		}
		tx, err := tn.App.BeginTxx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback()
		_, err = globex.AppendTx(ctx, tx, "order-9", eventstore.Any, evs)
		if !errors.Is(err, eventstore.ErrIdempotencyMismatch) || eventstore.IsRetryable(err) {
			t.Errorf("AppendTx with acme's event id as globex: err = %v (retryable %v); want ErrIdempotencyMismatch, not retryable",
				err, eventstore.IsRetryable(err))
		}
	})
}

// TestListRetiredIsPerTenant: ListRetired lists its own tenant's retired
// streams, never another tenant's live stream of the same id.
func TestListRetiredIsPerTenant(t *testing.T) {
	db := testdb.Open(t, "postgres")
	ctx := context.Background()
	s := newStore(t, db, pgstore.Config{})
	if _, err := s.Append(ctx, "order-1", eventstore.NoStream, eventstoretest.Evs("placed", 1)); err != nil {
		t.Fatal(err)
	}
	if _, err := pgstore.ArchiveStream(ctx, db, s.Schema(), "test", "order-1"); err != nil {
		t.Fatal(err)
	}
	acme, err := s.ForTenant("acme")
	if err != nil {
		t.Fatal(err)
	}
	defer acme.Close()
	if _, err := acme.Append(ctx, "order-1", eventstore.NoStream, eventstoretest.Evs("placed", 3)); err != nil {
		t.Fatal(err)
	}
	if got, err := pgstore.ListRetired(ctx, db, s.Schema(), "", 0); err != nil || len(got) != 1 || got[0].Events != 0 || got[0].ArchivedEvents != 1 {
		t.Errorf("ListRetired as tenant '': %+v, %v; want its one archived stream, none of acme's events counted", got, err)
	}
}

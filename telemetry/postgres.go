package telemetry

import (
	"context"

	"github.com/jmoiron/sqlx"
	"go.opentelemetry.io/otel/metric"
)

// oldestTransactionSQL is the age in seconds of the oldest transaction
// that holds a transaction id, in any database of the server, prepared
// (two-phase) transactions included. Such a transaction holds back the
// global feed: pgstore reads only events below the oldest running
// transaction id, so no event committed after it started reaches
// projections and relays until it ends. Read-only transactions hold no id
// and do not count.
const oldestTransactionSQL = `SELECT coalesce(extract(epoch FROM max(age)), 0)::float8 FROM (
	SELECT clock_timestamp() - xact_start AS age FROM pg_stat_activity WHERE backend_xid IS NOT NULL
	UNION ALL
	SELECT clock_timestamp() - prepared FROM pg_prepared_xacts) t`

// ObservePostgres reports, as the gauge
// stele.postgres.oldest_transaction.age (s, no attributes), the age of the
// oldest transaction on db's server that holds a transaction id (0 when
// there is none): a transaction left open holds back every projection and
// relay, so alert on it. Each collection runs one query. The role needs
// pg_read_all_stats (or to be a superuser) to see other roles' sessions.
// Observe each server once.
func (t *Telemetry) ObservePostgres(db *sqlx.DB) error {
	g, err := t.meter.Float64ObservableGauge("stele.postgres.oldest_transaction.age", metric.WithUnit("s"),
		metric.WithDescription("Age of the oldest transaction holding a transaction id, which holds back the global feed."))
	if err != nil {
		return err
	}
	_, err = t.meter.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
		var age float64
		if err := db.GetContext(ctx, &age, oldestTransactionSQL); err != nil {
			return err
		}
		o.ObserveFloat64(g, age)
		return nil
	}, g)
	return err
}

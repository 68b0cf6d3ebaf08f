package aggregate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"time"

	"github.com/stele-dev/stele/codec"
	"github.com/stele-dev/stele/eventstore"
)

var (
	// ErrNotFound: Load found no events for the aggregate.
	ErrNotFound = errors.New("aggregate: not found")
	// ErrTooManyConflicts: Update gave up after Config.MaxRetries conflicts.
	ErrTooManyConflicts = errors.New("aggregate: gave up after repeated concurrency conflicts")
)

// Config tunes a Repository.
type Config struct {
	// Category names the aggregate's streams: Category + "-" + id. Required.
	Category string
	// Codec encodes and decodes the events. Required.
	Codec *codec.Registry
	// Snapshots, when set, stores snapshots of the state; nil means none.
	Snapshots SnapshotStore
	// SnapshotEvery takes a snapshot whenever a save moves the version past a
	// multiple of it. Defaults to 100 when Snapshots is set.
	SnapshotEvery int
	// SnapshotVersion is the version of the state's shape. Snapshots taken
	// with another version are ignored (and the state is folded from events),
	// so bump it whenever the aggregate's fields change meaning. Defaults to 1.
	SnapshotVersion int
	// MaxRetries bounds Update's reloads after a concurrency conflict.
	// Defaults to 30: a busy aggregate sees about one conflict per two saves
	// (measured in examples/bank), and backoff keeps retries cheap.
	MaxRetries int
	// RetryBackoff is the first wait before a retry; each next wait doubles,
	// with jitter, up to RetryBackoffMax. Defaults 2ms and 200ms.
	RetryBackoff, RetryBackoffMax time.Duration
	// Logger receives failures to save a snapshot (the save itself stands).
	// Defaults to slog.Default().
	Logger *slog.Logger
}

// Repository loads and saves aggregates of type T (P is *T) in an event store.
type Repository[T any, P interface {
	*T
	Aggregate
}] struct {
	store eventstore.Store
	cfg   Config
}

// NewRepository returns a Repository over store.
func NewRepository[T any, P interface {
	*T
	Aggregate
}](store eventstore.Store, cfg Config) (*Repository[T, P], error) {
	var errs []error
	if store == nil {
		errs = append(errs, errors.New("aggregate: NewRepository: store is nil"))
	}
	if cfg.Category == "" || eventstore.ValidateStreamID(cfg.Category+"-x") != nil || eventstore.Category(cfg.Category+"-x") != cfg.Category {
		errs = append(errs, fmt.Errorf("aggregate: Config.Category %q: want a non-empty stream-id prefix without '-'", cfg.Category))
	}
	if cfg.Codec == nil {
		errs = append(errs, errors.New("aggregate: Config.Codec is required"))
	}
	if cfg.SnapshotEvery < 0 || cfg.MaxRetries < 0 {
		errs = append(errs, errors.New("aggregate: Config.SnapshotEvery and Config.MaxRetries must not be negative"))
	}
	// Tenants (pgstore.Store.ForTenant, pgsnapshot.Store.ForTenant): the
	// snapshots must be the events' tenant's, or a load could start from
	// another tenant's snapshot of the same stream id.
	if st, ok := store.(interface{ Tenant() string }); ok && cfg.Snapshots != nil {
		if sn, ok := cfg.Snapshots.(interface{ Tenant() string }); ok && sn.Tenant() != st.Tenant() {
			errs = append(errs, fmt.Errorf("aggregate: Config.Snapshots is tenant %q's, the store tenant %q's", sn.Tenant(), st.Tenant()))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if cfg.Snapshots != nil && cfg.SnapshotEvery == 0 {
		cfg.SnapshotEvery = 100
	}
	if cfg.SnapshotVersion == 0 {
		cfg.SnapshotVersion = 1
	}
	if cfg.MaxRetries == 0 {
		cfg.MaxRetries = 30
	}
	if cfg.RetryBackoff == 0 {
		cfg.RetryBackoff = 2 * time.Millisecond
	}
	if cfg.RetryBackoffMax == 0 {
		cfg.RetryBackoffMax = 200 * time.Millisecond
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Repository[T, P]{store: store, cfg: cfg}, nil
}

// StreamID is the stream that holds the aggregate id.
func (r *Repository[T, P]) StreamID(id string) string { return r.cfg.Category + "-" + id }

// New returns a fresh aggregate with the given id, at version 0.
func (r *Repository[T, P]) New(id string) P {
	agg := P(new(T))
	agg.root().id = id
	return agg
}

// Load rebuilds the aggregate: from its latest usable snapshot, then every
// newer event. It returns ErrNotFound when the stream has no events.
func (r *Repository[T, P]) Load(ctx context.Context, id string) (P, error) {
	agg, err := r.load(ctx, id)
	if err != nil {
		return nil, err
	}
	if agg.root().version == 0 {
		return nil, fmt.Errorf("loading %s: %w", r.StreamID(id), ErrNotFound)
	}
	return agg, nil
}

func (r *Repository[T, P]) load(ctx context.Context, id string) (P, error) {
	stream := r.StreamID(id)
	if err := eventstore.ValidateStreamID(stream); err != nil {
		return nil, err
	}
	agg := r.fromSnapshot(ctx, id)
	root := agg.root()
	for e, err := range eventstore.IterStream(ctx, r.store, stream, eventstore.ReadStreamOpts{From: root.version + 1}) {
		if err != nil {
			return nil, fmt.Errorf("loading %s: %w", stream, err)
		}
		v, err := r.cfg.Codec.Decode(e)
		if err != nil {
			return nil, fmt.Errorf("loading %s: %w", stream, err)
		}
		agg.Apply(v)
		root.version = e.Version
	}
	return agg, nil
}

// fromSnapshot returns the aggregate as of its snapshot, or a fresh one when
// there is no snapshot of the current shape.
func (r *Repository[T, P]) fromSnapshot(ctx context.Context, id string) P {
	agg := r.New(id)
	if r.cfg.Snapshots == nil {
		return agg
	}
	snap, ok, err := r.cfg.Snapshots.LoadSnapshot(ctx, r.StreamID(id))
	if err != nil {
		r.cfg.Logger.Warn("aggregate: loading snapshot failed; folding all events", "stream", r.StreamID(id), "err", err)
		return agg
	}
	if !ok || snap.SchemaVersion != r.cfg.SnapshotVersion {
		return agg // none, or taken from an older shape: never mis-decode it
	}
	if err := unmarshalState(agg, snap.Data); err != nil {
		r.cfg.Logger.Warn("aggregate: snapshot does not decode; folding all events", "stream", r.StreamID(id), "err", err)
		return r.New(id)
	}
	agg.root().id = id
	agg.root().version = snap.Version
	return agg
}

// Save appends the aggregate's pending events if its stream is still at the
// version it was loaded at; otherwise it returns an error matching
// eventstore.ErrConcurrencyConflict and changes nothing. Metadata set on ctx
// with WithMetadata goes on every event. After an error that leaves the
// outcome unknown, calling Save again with the same aggregate is safe: the
// events keep the ids they got when recorded, so a save that did commit is
// recognised and not repeated.
func (r *Repository[T, P]) Save(ctx context.Context, agg P) error {
	root := agg.root()
	if len(root.pending) == 0 {
		return nil
	}
	md := metadataFrom(ctx)
	events := make([]eventstore.EventData, len(root.pending))
	for i, e := range root.pending {
		data, err := r.cfg.Codec.Encode(e)
		if err != nil {
			return fmt.Errorf("saving %s: %w", r.StreamID(root.id), err)
		}
		data.ID = root.pendingIDs[i]
		data.Metadata = md
		events[i] = data
	}
	before := root.version
	res, err := r.store.Append(ctx, r.StreamID(root.id), eventstore.Exact(before), events)
	if err != nil {
		return fmt.Errorf("saving %s: %w", r.StreamID(root.id), err)
	}
	root.version = res.LastVersion
	root.pending, root.pendingIDs = nil, nil
	if every := eventstore.Version(r.cfg.SnapshotEvery); r.cfg.Snapshots != nil && before/every != root.version/every {
		r.snapshot(ctx, agg)
	}
	return nil
}

func (r *Repository[T, P]) snapshot(ctx context.Context, agg P) {
	root := agg.root()
	data, err := marshalState(agg)
	if err == nil {
		err = r.cfg.Snapshots.SaveSnapshot(ctx, Snapshot{
			StreamID: r.StreamID(root.id), Version: root.version,
			SchemaVersion: r.cfg.SnapshotVersion, Data: data,
		})
	}
	if err != nil {
		r.cfg.Logger.Warn("aggregate: saving snapshot failed", "stream", r.StreamID(root.id), "version", root.version, "err", err)
	}
}

// Update loads the aggregate (a fresh one if it has no events yet), runs fn
// on it and saves what fn recorded. On a concurrency conflict it reloads and
// runs fn again, waiting a little longer each time (exponential backoff with
// jitter), up to Config.MaxRetries times. An error from fn is returned as is
// and nothing is saved.
func (r *Repository[T, P]) Update(ctx context.Context, id string, fn func(P) error) error {
	wait := r.cfg.RetryBackoff
	for attempt := 0; ; attempt++ {
		agg, err := r.load(ctx, id)
		if err != nil {
			return err
		}
		if err := fn(agg); err != nil {
			return err
		}
		err = r.Save(ctx, agg)
		if !errors.Is(err, eventstore.ErrConcurrencyConflict) {
			return err
		}
		if attempt == r.cfg.MaxRetries {
			return fmt.Errorf("%w (%d attempts): %w", ErrTooManyConflicts, attempt+1, err)
		}
		// Full jitter: racing writers spread out instead of colliding again.
		select {
		case <-time.After(rand.N(wait) + time.Microsecond):
		case <-ctx.Done():
			return ctx.Err()
		}
		wait = min(2*wait, r.cfg.RetryBackoffMax)
	}
}

// StateMarshaler lets an aggregate choose its snapshot encoding; without it
// the state is its exported fields in JSON.
type StateMarshaler interface {
	MarshalState() ([]byte, error)
	UnmarshalState([]byte) error
}

func marshalState(agg Aggregate) ([]byte, error) {
	if m, ok := agg.(StateMarshaler); ok {
		return m.MarshalState()
	}
	return json.Marshal(agg)
}

func unmarshalState(agg Aggregate, data []byte) error {
	if m, ok := agg.(StateMarshaler); ok {
		return m.UnmarshalState(data)
	}
	return json.Unmarshal(data, agg)
}

type metadataKey struct{}

// WithMetadata returns a context whose saves put md on every event:
// correlation and causation ids, trace context, user keys.
func WithMetadata(ctx context.Context, md eventstore.Metadata) context.Context {
	return context.WithValue(ctx, metadataKey{}, md)
}

func metadataFrom(ctx context.Context) eventstore.Metadata {
	md, _ := ctx.Value(metadataKey{}).(eventstore.Metadata)
	return md
}

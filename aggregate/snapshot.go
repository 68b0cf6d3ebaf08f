package aggregate

import (
	"bytes"
	"context"
	"sync"
	"time"

	"github.com/stele-dev/stele/eventstore"
)

// Snapshot is an aggregate's state as of Version, so a load reads only the
// events after it.
type Snapshot struct {
	StreamID string
	Version  eventstore.Version
	// SchemaVersion is Config.SnapshotVersion when it was taken; a snapshot of
	// another version is ignored.
	SchemaVersion int
	Data          []byte
	TakenAt       time.Time
}

// SnapshotStore keeps the latest snapshot of each stream. Snapshots are a
// cache: losing one costs a longer load, never correctness.
type SnapshotStore interface {
	LoadSnapshot(ctx context.Context, streamID string) (Snapshot, bool, error)
	// SaveSnapshot keeps s unless a snapshot of a later version is stored.
	SaveSnapshot(ctx context.Context, s Snapshot) error
}

// MemorySnapshots is a SnapshotStore in memory.
type MemorySnapshots struct {
	mu    sync.Mutex
	snaps map[string]Snapshot
}

// NewMemorySnapshots returns an empty in-memory snapshot store.
func NewMemorySnapshots() *MemorySnapshots {
	return &MemorySnapshots{snaps: make(map[string]Snapshot)}
}

// LoadSnapshot returns the stream's snapshot, if any.
func (m *MemorySnapshots) LoadSnapshot(_ context.Context, streamID string) (Snapshot, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.snaps[streamID]
	s.Data = bytes.Clone(s.Data)
	return s, ok, nil
}

// SaveSnapshot keeps s unless a later one is stored.
func (m *MemorySnapshots) SaveSnapshot(_ context.Context, s Snapshot) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if old, ok := m.snaps[s.StreamID]; ok && old.Version > s.Version {
		return nil
	}
	if s.TakenAt.IsZero() {
		s.TakenAt = time.Now()
	}
	s.Data = bytes.Clone(s.Data)
	m.snaps[s.StreamID] = s
	return nil
}

package gdpr

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"unicode/utf8"
)

// KeySize is the size of a subject's data key: AES-256.
const KeySize = 32

// MaxSubjectBytes is the longest subject id accepted.
const MaxSubjectBytes = 255

// Key is a data subject's key.
type Key struct {
	// ID names this key of the subject. A subject forgotten and seen again
	// gets a new key with a new ID, so data encrypted under the old one is
	// recognised as erased instead of failing to authenticate.
	ID string
	// Material is the AES-256 data key, KeySize bytes.
	Material []byte
}

// ErrNoKey is returned by KeyStore.Key when the subject has no key: never
// had one, or was forgotten.
var ErrNoKey = errors.New("gdpr: no key for subject")

// ErrInvalidSubject: a subject id that is empty, longer than
// MaxSubjectBytes, not UTF-8 or holding NUL.
var ErrInvalidSubject = errors.New("gdpr: invalid subject id")

// KeyStore keeps one key per data subject.
//
// Implementations must be safe for concurrent use. A KMS-backed store keeps
// data keys wrapped (encrypted) by a master key that never leaves the KMS
// (envelope encryption): PostgresKeyStore with a KeyWrapper that calls the
// KMS's Encrypt and Decrypt does exactly that, and so can any other store.
type KeyStore interface {
	// Key returns the subject's current key, or an error matching ErrNoKey.
	Key(ctx context.Context, subject string) (Key, error)
	// Create returns the subject's current key, making one if there is none.
	// Concurrent calls for one subject return the same key.
	Create(ctx context.Context, subject string) (Key, error)
	// Delete destroys the subject's key (forgets the subject) and reports
	// whether there was one. Data encrypted with it is unreadable from then
	// on.
	Delete(ctx context.Context, subject string) (bool, error)
}

// ValidateSubject checks a subject id: 1 to MaxSubjectBytes bytes of UTF-8
// without NUL (PostgreSQL text cannot hold NUL).
func ValidateSubject(subject string) error {
	switch {
	case subject == "":
		return fmt.Errorf("%w: empty", ErrInvalidSubject)
	case len(subject) > MaxSubjectBytes:
		return fmt.Errorf("%w: %d bytes, more than %d", ErrInvalidSubject, len(subject), MaxSubjectBytes)
	case !utf8.ValidString(subject):
		return fmt.Errorf("%w: not UTF-8", ErrInvalidSubject)
	case bytes.IndexByte([]byte(subject), 0) >= 0:
		return fmt.Errorf("%w: holds NUL", ErrInvalidSubject)
	}
	return nil
}

// NewKey returns a fresh random key, for KeyStore implementations.
func NewKey() (Key, error) {
	id := make([]byte, 8)
	material := make([]byte, KeySize)
	if _, err := rand.Read(id); err != nil {
		return Key{}, fmt.Errorf("gdpr: generating a key: %w", err)
	}
	if _, err := rand.Read(material); err != nil {
		return Key{}, fmt.Errorf("gdpr: generating a key: %w", err)
	}
	return Key{ID: hex.EncodeToString(id), Material: material}, nil
}

// MemoryKeyStore is a KeyStore in memory, for tests and examples.
type MemoryKeyStore struct {
	mu   sync.Mutex
	keys map[string]Key
}

var _ KeyStore = (*MemoryKeyStore)(nil)

// NewMemoryKeyStore returns an empty MemoryKeyStore.
func NewMemoryKeyStore() *MemoryKeyStore { return &MemoryKeyStore{keys: map[string]Key{}} }

// Key returns the subject's key or ErrNoKey.
func (m *MemoryKeyStore) Key(_ context.Context, subject string) (Key, error) {
	if err := ValidateSubject(subject); err != nil {
		return Key{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	k, ok := m.keys[subject]
	if !ok {
		return Key{}, ErrNoKey
	}
	return Key{ID: k.ID, Material: bytes.Clone(k.Material)}, nil
}

// Create returns the subject's key, making it if needed.
func (m *MemoryKeyStore) Create(_ context.Context, subject string) (Key, error) {
	if err := ValidateSubject(subject); err != nil {
		return Key{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	k, ok := m.keys[subject]
	if !ok {
		var err error
		if k, err = NewKey(); err != nil {
			return Key{}, err
		}
		m.keys[subject] = k
	}
	return Key{ID: k.ID, Material: bytes.Clone(k.Material)}, nil
}

// Delete forgets the subject, overwriting the key material it held.
func (m *MemoryKeyStore) Delete(_ context.Context, subject string) (bool, error) {
	if err := ValidateSubject(subject); err != nil {
		return false, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	k, ok := m.keys[subject]
	if ok {
		clear(k.Material)
		delete(m.keys, subject)
	}
	return ok, nil
}

// KeyWrapper wraps (encrypts) data keys with a key-encryption key before a
// KeyStore stores them, and unwraps them after reading: envelope encryption.
// A KMS-backed wrapper calls the KMS (AWS KMS Encrypt/Decrypt, GCP KMS,
// Vault transit, ...) so the master key never leaves it; NewAESKeyWrapper is
// a local one whose master key the application supplies.
//
// Wrapping means a copy of the key table (a dump, a backup, a replica) is
// useless without the master key, and destroying a master key after
// re-wrapping every live key with its successor makes every older copy of
// the table unreadable at once.
type KeyWrapper interface {
	// Name identifies the master key; it is stored with every key it
	// wrapped, and a key wrapped under another name is refused.
	Name() string
	// Wrap encrypts a data key of subject.
	Wrap(ctx context.Context, subject string, dataKey []byte) ([]byte, error)
	// Unwrap decrypts what Wrap returned for the same subject.
	Unwrap(ctx context.Context, subject string, wrapped []byte) ([]byte, error)
}

type aesWrapper struct {
	name string
	aead cipher.AEAD
}

// NewAESKeyWrapper returns a KeyWrapper that wraps data keys with AES-256-GCM
// under kek (KeySize bytes), binding each to its subject. name identifies
// kek (say "kek-2026-05"); keep kek outside the database, in a secret store.
func NewAESKeyWrapper(name string, kek []byte) (KeyWrapper, error) {
	if name == "" {
		return nil, errors.New("gdpr: NewAESKeyWrapper: empty name")
	}
	if len(kek) != KeySize {
		return nil, fmt.Errorf("gdpr: NewAESKeyWrapper: key-encryption key of %d bytes, want %d", len(kek), KeySize)
	}
	block, err := aes.NewCipher(kek)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &aesWrapper{name: "aes-gcm:" + name, aead: aead}, nil
}

func (w *aesWrapper) Name() string { return w.name }

func (w *aesWrapper) aad(subject string) []byte {
	return []byte("stele gdpr key wrap v1\x00" + w.name + "\x00" + subject)
}

func (w *aesWrapper) Wrap(_ context.Context, subject string, dataKey []byte) ([]byte, error) {
	nonce := make([]byte, w.aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	return w.aead.Seal(nonce, nonce, dataKey, w.aad(subject)), nil
}

func (w *aesWrapper) Unwrap(_ context.Context, subject string, wrapped []byte) ([]byte, error) {
	n := w.aead.NonceSize()
	if len(wrapped) < n+w.aead.Overhead() {
		return nil, errors.New("gdpr: wrapped key too short")
	}
	dk, err := w.aead.Open(nil, wrapped[:n], wrapped[n:], w.aad(subject))
	if err != nil {
		return nil, fmt.Errorf("gdpr: unwrapping the key of %q with %s: %w", subject, w.name, err)
	}
	return dk, nil
}

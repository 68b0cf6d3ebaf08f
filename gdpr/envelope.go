package gdpr

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
)

// Erased is what a personal string field reads as once its subject has been
// forgotten (a []byte field reads as nil). Decoding does not fail: streams,
// aggregates and projections keep working and show this instead.
const Erased = "[erased]"

// EnvelopePrefix starts every encrypted value as stored:
//
//	stele:pii:v1:<key id>:<base64url(nonce ‖ AES-256-GCM ciphertext ‖ tag)>
//
// The key id says which key of the subject sealed it; the subject is the
// value of the field the tag names, and is authenticated (GCM additional
// data) together with the key id, so a value copied into another subject's
// event does not decrypt there.
const EnvelopePrefix = "stele:pii:v1:"

var errMalformed = errors.New("gdpr: malformed encrypted value")

const nonceSize = 12

// sealer encrypts and decrypts with one key of one subject.
type sealer struct {
	keyID    string
	aead     cipher.AEAD
	nonceKey []byte
}

// newSealer derives, with HKDF-SHA-256, the AES-256-GCM key and the key of
// the synthetic nonces from the subject's data key.
func newSealer(k Key) (*sealer, error) {
	if len(k.Material) != KeySize {
		return nil, fmt.Errorf("gdpr: key of %d bytes, want %d", len(k.Material), KeySize)
	}
	if k.ID == "" || strings.ContainsAny(k.ID, ":") {
		return nil, fmt.Errorf("gdpr: key id %q: want a non-empty id without ':'", k.ID)
	}
	encKey, err := hkdf.Key(sha256.New, k.Material, nil, "stele gdpr v1 aes-256-gcm", KeySize)
	if err != nil {
		return nil, err
	}
	nonceKey, err := hkdf.Key(sha256.New, k.Material, nil, "stele gdpr v1 synthetic nonce", KeySize)
	if err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(encKey)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &sealer{keyID: k.ID, aead: aead, nonceKey: nonceKey}, nil
}

func (s *sealer) aad(subject string) []byte {
	return []byte(EnvelopePrefix + s.keyID + ":" + subject)
}

// seal returns the envelope of plaintext. With random false the nonce is
// synthetic, HMAC-SHA-256(nonce key, additional data ‖ 0 ‖ plaintext): the
// same value of the same subject always seals to the same bytes, so an
// append retried with re-encoded events is recognised as the same append.
func (s *sealer) seal(subject string, plaintext []byte, random bool) (string, error) {
	aad := s.aad(subject)
	nonce := make([]byte, nonceSize, nonceSize+len(plaintext)+s.aead.Overhead())
	if random {
		if _, err := rand.Read(nonce); err != nil {
			return "", err
		}
	} else {
		m := hmac.New(sha256.New, s.nonceKey)
		m.Write(aad)
		m.Write([]byte{0})
		m.Write(plaintext)
		copy(nonce, m.Sum(nil))
	}
	blob := s.aead.Seal(nonce, nonce, plaintext, aad)
	return EnvelopePrefix + s.keyID + ":" + base64.RawURLEncoding.EncodeToString(blob), nil
}

// open decrypts blob, sealed for subject by this key.
func (s *sealer) open(subject string, blob []byte) ([]byte, error) {
	pt, err := s.aead.Open(nil, blob[:nonceSize], blob[nonceSize:], s.aad(subject))
	if err != nil {
		return nil, fmt.Errorf("gdpr: an encrypted value of subject %q does not authenticate (altered, or moved from another event): %w", subject, err)
	}
	return pt, nil
}

// parseEnvelope splits a stored value. ok is false for a value that is not
// an envelope (plaintext written before protection was turned on).
func parseEnvelope(v string) (keyID string, blob []byte, ok bool, err error) {
	rest, ok := strings.CutPrefix(v, EnvelopePrefix)
	if !ok {
		return "", nil, false, nil
	}
	keyID, b64, found := strings.Cut(rest, ":")
	if !found || keyID == "" {
		return "", nil, true, errMalformed
	}
	blob, err = base64.RawURLEncoding.DecodeString(b64)
	if err != nil || len(blob) < nonceSize+16 {
		return "", nil, true, errMalformed
	}
	return keyID, blob, true, nil
}

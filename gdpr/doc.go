// Package gdpr protects personal data in events by crypto-shredding: each
// data subject (a customer, a user) has a key of their own, the fields of an
// event that hold their personal data are encrypted with it before the event
// is stored, and forgetting the subject deletes the key. From then on those
// fields can never be read again, from the live store or from any copy of
// it, while the rest of the event, the stream, aggregates and projections
// keep working: a forgotten string field reads as the placeholder Erased,
// a forgotten []byte field as nil.
//
// Mark the personal fields of an event with a struct tag naming the field
// that holds the subject's id, in the same struct:
//
//	type CustomerRegistered struct {
//		CustomerID string `json:"customer_id"`
//		Email      string `json:"email" personal:"subject=CustomerID"`
//		Photo      []byte `json:"photo" personal:"subject=CustomerID"`
//		Plan       string `json:"plan"` // not personal: stays readable
//	}
//
// and encode events with a Protector wrapped around the codec, per registry:
//
//	keys, _ := gdpr.NewPostgresKeyStore(db, "stele_keys", nil)
//	protector, _ := gdpr.NewProtector(codec.JSON, keys, nil)
//	reg := codec.NewRegistry(protector)
//
// Forget a subject with Forget (or `stele gdpr forget SUBJECT --actor NAME`),
// which deletes the key through pgstore's audited admin path. Keys live
// behind the KeyStore interface: PostgresKeyStore keeps them in a schema of
// their own, optionally wrapped by a key-encryption key (KeyWrapper: a local
// AES key, or a KMS); MemoryKeyStore is for tests.
//
// See docs/security.md, "Crypto-shredding", for what this does and does not
// promise.
package gdpr

package gdpr_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/stele-dev/stele/codec"
	"github.com/stele-dev/stele/eventstore"
	"github.com/stele-dev/stele/gdpr"
)

type Address struct {
	Owner  string `json:"owner"`
	Street string `json:"street" personal:"subject=Owner"`
}

type Base struct {
	CustomerID string `json:"customer_id"`
}

// Registered exercises every supported shape of personal data.
type Registered struct {
	Base                     // the subject field, promoted
	Name     string          `json:"name" personal:"subject=CustomerID"`
	Email    string          `json:"email" personal:"subject=CustomerID"`
	Photo    []byte          `json:"photo" personal:"subject=CustomerID"`
	Nick     *string         `json:"nick" personal:"subject=CustomerID"`
	Phones   []string        `json:"phones" personal:"subject=CustomerID"`
	Plan     string          `json:"plan"`
	Home     Address         `json:"home"`
	Work     *Address        `json:"work"`
	Previous []Address       `json:"previous"`
	Others   [2]*Address     `json:"others"`
	Account  uuid.UUID       `json:"account"`
	ByUUID   ByUUID          `json:"by_uuid"`
	Raw      json.RawMessage `json:"raw,omitempty"`
}

type ByUUID struct {
	ID   uuid.UUID `json:"id"`
	Note string    `json:"note" personal:"subject=ID"`
}

func ptr[T any](v T) *T { return &v }

func sample(id string) Registered {
	acct := uuid.MustParse("0195f0c2-0000-7000-8000-000000000001")
	return Registered{
		Base:     Base{CustomerID: id},
		Name:     "Ada " + id,
		Email:    id + "@example.com",
		Photo:    []byte("\x89PNG photo of " + id),
		Nick:     ptr("nick-" + id),
		Phones:   []string{"+1-555-" + id, "", "+44-20-" + id},
		Plan:     "gold",
		Home:     Address{Owner: id, Street: "1 Home St " + id},
		Work:     &Address{Owner: id, Street: "2 Work Rd " + id},
		Previous: []Address{{Owner: id, Street: "3 Old Ln " + id}},
		Others:   [2]*Address{nil, {Owner: id, Street: "4 Other Av " + id}},
		Account:  acct,
		ByUUID:   ByUUID{ID: acct, Note: "note about " + acct.String()},
	}
}

// plaintexts lists every personal value of r.
func plaintexts(r Registered) []string {
	out := []string{r.Name, r.Email, string(r.Photo), *r.Nick, r.Home.Street, r.Work.Street, r.Previous[0].Street, r.Others[1].Street, r.ByUUID.Note}
	for _, p := range r.Phones {
		if p != "" {
			out = append(out, p)
		}
	}
	return out
}

func newProtector(t *testing.T, keys gdpr.KeyStore, opts *gdpr.Options) *gdpr.Protector {
	t.Helper()
	p, err := gdpr.NewProtector(codec.JSON, keys, opts)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestPersonalRoundTrip: every shape of tagged field is stored encrypted,
// decodes to the original, the caller's value is left alone, and untagged
// fields stay readable.
func TestPersonalRoundTrip(t *testing.T) {
	keys := gdpr.NewMemoryKeyStore()
	p := newProtector(t, keys, nil)
	in := sample("c1")
	orig := sample("c1")
	data, err := p.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(in, orig) {
		t.Fatalf("Marshal changed its argument:\n%+v", in)
	}
	for _, pt := range plaintexts(in) {
		if bytes.Contains(data, []byte(pt)) {
			t.Errorf("stored data holds %q:\n%s", pt, data)
		}
	}
	for _, clear := range []string{`"plan":"gold"`, `"customer_id":"c1"`, `"owner":"c1"`} {
		if !bytes.Contains(data, []byte(clear)) {
			t.Errorf("stored data lacks %s:\n%s", clear, data)
		}
	}
	if n := bytes.Count(data, []byte(gdpr.EnvelopePrefix)); n != 10 { // photo is base64 of an envelope
		t.Errorf("%d string envelopes, want 10:\n%s", n, data)
	}
	var out Registered
	if err := p.Unmarshal(data, &out); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(out, orig) {
		t.Fatalf("decoded\n%+v\nwant\n%+v", out, orig)
	}
	// A pointer encodes the same as the value.
	if data2, err := p.Marshal(&in); err != nil || !bytes.Equal(data, data2) {
		t.Fatalf("Marshal(&v) differs from Marshal(v): %v", err)
	}
}

// TestPersonalForgetGivesPlaceholder: once a subject's key is deleted its
// fields decode as Erased (nil bytes) without error, other subjects still
// decode, and a subject seen again gets a new key that does not revive the
// old data.
func TestPersonalForgetGivesPlaceholder(t *testing.T) {
	ctx := context.Background()
	keys := gdpr.NewMemoryKeyStore()
	p := newProtector(t, keys, nil)
	alice, bob := sample("alice"), sample("bob")
	aData, err := p.Marshal(alice)
	if err != nil {
		t.Fatal(err)
	}
	bData, err := p.Marshal(bob)
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := keys.Delete(ctx, "alice"); !ok || err != nil {
		t.Fatalf("Delete: %v %v", ok, err)
	}
	var got Registered
	if err := p.Unmarshal(aData, &got); err != nil {
		t.Fatalf("decoding a forgotten subject's event: %v", err)
	}
	want := Registered{
		Base: Base{CustomerID: "alice"}, Name: gdpr.Erased, Email: gdpr.Erased, Photo: nil, Nick: ptr(gdpr.Erased),
		Phones: []string{gdpr.Erased, "", gdpr.Erased}, Plan: "gold",
		Home: Address{Owner: "alice", Street: gdpr.Erased}, Work: &Address{Owner: "alice", Street: gdpr.Erased},
		Previous: []Address{{Owner: "alice", Street: gdpr.Erased}}, Others: [2]*Address{nil, {Owner: "alice", Street: gdpr.Erased}},
		Account: alice.Account, ByUUID: alice.ByUUID, // a subject of its own, still known
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("forgotten subject decoded as\n%+v\nwant\n%+v", got, want)
	}
	var b Registered
	if err := p.Unmarshal(bData, &b); err != nil || !reflect.DeepEqual(b, sample("bob")) {
		t.Fatalf("another subject: %v\n%+v", err, b)
	}
	// alice comes back: a new key, new data readable, old data still erased.
	again := sample("alice")
	again.Email = "new-alice@example.com"
	nData, err := p.Marshal(again)
	if err != nil {
		t.Fatal(err)
	}
	var n, o Registered
	if err := p.Unmarshal(nData, &n); err != nil || n.Email != "new-alice@example.com" {
		t.Fatalf("new data of a returning subject: %v %q", err, n.Email)
	}
	if err := p.Unmarshal(aData, &o); err != nil || o.Email != gdpr.Erased {
		t.Fatalf("old data of a returning subject: %v %q", err, o.Email)
	}
}

// TestPersonalDeterministic: the same event encodes to the same bytes (so a
// retried append is recognised), unless RandomNonces.
func TestPersonalDeterministic(t *testing.T) {
	keys := gdpr.NewMemoryKeyStore()
	p := newProtector(t, keys, nil)
	a, _ := p.Marshal(sample("x"))
	b, _ := p.Marshal(sample("x"))
	if !bytes.Equal(a, b) {
		t.Fatal("two encodings of one event differ")
	}
	r := newProtector(t, keys, &gdpr.Options{RandomNonces: true})
	c, _ := r.Marshal(sample("x"))
	d, _ := r.Marshal(sample("x"))
	if bytes.Equal(c, d) {
		t.Fatal("RandomNonces gave equal encodings")
	}
	var out Registered
	if err := p.Unmarshal(c, &out); err != nil || !reflect.DeepEqual(out, sample("x")) {
		t.Fatalf("random-nonce data decoded by a synthetic-nonce protector: %v", err)
	}
}

// TestPersonalRefusals: bad tags, missing subjects, tampered values and key
// store outages are errors, never silent plaintext or placeholders.
func TestPersonalRefusals(t *testing.T) {
	keys := gdpr.NewMemoryKeyStore()
	p := newProtector(t, keys, nil)

	type noSubject struct {
		ID    string
		Email string `personal:"subject=Missing"`
	}
	type badKind struct {
		ID  string
		Age int `personal:"subject=ID"`
	}
	type badTag struct {
		ID    string
		Email string `personal:"owner=ID"`
	}
	type personalSubject struct {
		ID    string `personal:"subject=ID"`
		Email string `personal:"subject=ID"`
	}
	type pointerSubject struct {
		ID    *string
		Email string `personal:"subject=ID"`
	}
	type nested struct{ Inner badKind }
	for _, v := range []any{noSubject{}, badKind{}, badTag{}, personalSubject{}, pointerSubject{}, nested{}} {
		if err := gdpr.Check(v); !errors.Is(err, gdpr.ErrBadTag) {
			t.Errorf("Check(%T) = %v, want ErrBadTag", v, err)
		}
		if _, err := p.Marshal(v); !errors.Is(err, gdpr.ErrBadTag) {
			t.Errorf("Marshal(%T) = %v, want ErrBadTag", v, err)
		}
	}
	if err := gdpr.Check(sample("ok")); err != nil {
		t.Fatal(err)
	}

	empty := sample("")
	if _, err := p.Marshal(empty); !errors.Is(err, gdpr.ErrNoSubject) {
		t.Fatalf("personal data without a subject: %v", err)
	}
	if _, err := p.Marshal(Address{Owner: "", Street: ""}); err != nil {
		t.Fatalf("an empty personal field needs no subject: %v", err)
	}

	data, err := p.Marshal(Address{Owner: "o", Street: "secret street"})
	if err != nil {
		t.Fatal(err)
	}
	var a Address
	_ = json.Unmarshal(data, &a)
	// Flip one character of the ciphertext.
	last := a.Street[len(a.Street)-2]
	flip := byte('A')
	if last == 'A' {
		flip = 'B'
	}
	tampered := a.Street[:len(a.Street)-2] + string(flip) + a.Street[len(a.Street)-1:]
	for name, street := range map[string]string{
		"tampered":  tampered,
		"malformed": gdpr.EnvelopePrefix + "nokeyid",
		"short":     gdpr.EnvelopePrefix + "abc:AAAA",
	} {
		raw, _ := json.Marshal(Address{Owner: "o", Street: street})
		var out Address
		if err := p.Unmarshal(raw, &out); err == nil {
			t.Errorf("%s value decoded as %q", name, out.Street)
		}
	}
	// A value moved into another subject's event does not decode there.
	if _, err := p.Marshal(Address{Owner: "mallory", Street: "x"}); err != nil {
		t.Fatal(err)
	}
	moved, _ := json.Marshal(Address{Owner: "mallory", Street: a.Street})
	var out Address
	if err := p.Unmarshal(moved, &out); err != nil || out.Street != gdpr.Erased {
		t.Errorf("a value moved to another subject decoded as %q (%v), want the placeholder", out.Street, err)
	}

	// Plaintext written before protection decodes as is.
	var legacy Address
	if err := p.Unmarshal([]byte(`{"owner":"o","street":"plain street"}`), &legacy); err != nil || legacy.Street != "plain street" {
		t.Fatalf("legacy plaintext: %v %q", err, legacy.Street)
	}

	// An outage of the key store is an error, never the placeholder.
	down := &flakyKeys{KeyStore: keys}
	q := newProtector(t, down, nil)
	down.fail.Store(true)
	var o Address
	if err := q.Unmarshal(data, &o); err == nil || o.Street == gdpr.Erased {
		t.Fatalf("key store down: %v, street %q", err, o.Street)
	}
	if _, err := q.Marshal(Address{Owner: "o2", Street: "s"}); err == nil {
		t.Fatal("encoded with the key store down")
	}
}

type flakyKeys struct {
	gdpr.KeyStore
	fail  atomic.Bool
	reads atomic.Int64
}

func (f *flakyKeys) Key(ctx context.Context, subject string) (gdpr.Key, error) {
	f.reads.Add(1)
	if f.fail.Load() {
		return gdpr.Key{}, errors.New("connection refused")
	}
	return f.KeyStore.Key(ctx, subject)
}

func (f *flakyKeys) Create(ctx context.Context, subject string) (gdpr.Key, error) {
	if f.fail.Load() {
		return gdpr.Key{}, errors.New("connection refused")
	}
	return f.KeyStore.Create(ctx, subject)
}

// TestPersonalKeyCache: with CacheTTL keys are read once per TTL; Evict
// drops one at once; without it each call reads each subject once.
func TestPersonalKeyCache(t *testing.T) {
	keys := &flakyKeys{KeyStore: gdpr.NewMemoryKeyStore()}
	p := newProtector(t, keys, nil)
	data, _ := p.Marshal(sample("c"))
	before := keys.reads.Load()
	var out Registered
	_ = p.Unmarshal(data, &out)
	if n := keys.reads.Load() - before; n != 2 { // subjects "c" and the account uuid
		t.Fatalf("%d key reads for one decode, want 2", n)
	}
	c := newProtector(t, keys, &gdpr.Options{CacheTTL: time.Hour})
	_ = c.Unmarshal(data, &out)
	before = keys.reads.Load()
	for range 10 {
		_ = c.Unmarshal(data, &out)
	}
	if n := keys.reads.Load() - before; n != 0 {
		t.Fatalf("%d key reads with a warm cache", n)
	}
	_, _ = keys.Delete(context.Background(), "c")
	if _ = c.Unmarshal(data, &out); out.Email == gdpr.Erased {
		t.Fatal("the cache should still hold the key (documented)")
	}
	c.Evict("c")
	if _ = c.Unmarshal(data, &out); out.Email != gdpr.Erased {
		t.Fatalf("after Evict: %q", out.Email)
	}
}

// TestPersonalRegistry: a registry made with the Protector encrypts on
// Encode and decrypts on Decode, reads events stored before protection, and
// decodes a forgotten subject's event with the placeholder.
func TestPersonalRegistry(t *testing.T) {
	ctx := context.Background()
	keys := gdpr.NewMemoryKeyStore()
	p := newProtector(t, keys, nil)
	reg := codec.NewRegistry(p)
	codec.MustRegister[Address](reg, "address.set", 1)
	ed, err := reg.Encode(&Address{Owner: "s1", Street: "Main St 1"})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(ed.Data), "Main St") || ed.ContentType != "application/json; v=1" {
		t.Fatalf("encoded %s (%s)", ed.Data, ed.ContentType)
	}
	ev := eventstore.Event{StreamID: "addr-1", Version: 1, Type: ed.Type, Data: ed.Data, ContentType: ed.ContentType}
	v, err := reg.Decode(ev)
	if err != nil || v.(Address).Street != "Main St 1" {
		t.Fatalf("Decode: %v %+v", err, v)
	}
	plain := codec.NewRegistry(nil)
	codec.MustRegister[Address](plain, "address.set", 1)
	old, _ := plain.Encode(Address{Owner: "s0", Street: "Old St"})
	if v, err := reg.Decode(eventstore.Event{Type: old.Type, Data: old.Data, ContentType: old.ContentType}); err != nil || v.(Address).Street != "Old St" {
		t.Fatalf("an event stored before protection: %v %+v", err, v)
	}
	_, _ = keys.Delete(ctx, "s1")
	v, err = reg.Decode(ev)
	if err != nil || v.(Address).Street != gdpr.Erased {
		t.Fatalf("after forget: %v %+v", err, v)
	}
	// A tampered event is undecodable, with the event named.
	bad := ev
	bad.Data = []byte(`{"owner":"s1","street":"` + gdpr.EnvelopePrefix + `x:!!"}`)
	if _, err := reg.Decode(bad); !errors.Is(err, codec.ErrUndecodable) {
		t.Fatalf("tampered: %v", err)
	}
}

// TestKeyWrapper: wrapped keys round-trip, are bound to their subject, and
// are refused under another key-encryption key.
func TestKeyWrapper(t *testing.T) {
	ctx := context.Background()
	kek := bytes.Repeat([]byte{7}, gdpr.KeySize)
	w, err := gdpr.NewAESKeyWrapper("test", kek)
	if err != nil {
		t.Fatal(err)
	}
	dk := bytes.Repeat([]byte{1}, gdpr.KeySize)
	wrapped, err := w.Wrap(ctx, "s", dk)
	if err != nil || bytes.Contains(wrapped, dk) {
		t.Fatalf("Wrap: %v", err)
	}
	if got, err := w.Unwrap(ctx, "s", wrapped); err != nil || !bytes.Equal(got, dk) {
		t.Fatalf("Unwrap: %v", err)
	}
	if _, err := w.Unwrap(ctx, "other", wrapped); err == nil {
		t.Fatal("a wrapped key moved to another subject unwrapped")
	}
	w2, _ := gdpr.NewAESKeyWrapper("test", bytes.Repeat([]byte{8}, gdpr.KeySize))
	if _, err := w2.Unwrap(ctx, "s", wrapped); err == nil {
		t.Fatal("unwrapped with the wrong key-encryption key")
	}
	if _, err := gdpr.NewAESKeyWrapper("short", kek[:16]); err == nil {
		t.Fatal("a 16-byte key-encryption key was accepted")
	}
}

// TestKeySubjects: subject ids are validated by every store call.
func TestKeySubjects(t *testing.T) {
	ctx := context.Background()
	m := gdpr.NewMemoryKeyStore()
	for _, s := range []string{"", strings.Repeat("x", 256), "a\x00b", "\xff"} {
		if _, err := m.Create(ctx, s); !errors.Is(err, gdpr.ErrInvalidSubject) {
			t.Errorf("Create(%q): %v", s, err)
		}
	}
	if _, err := m.Key(ctx, "none"); !errors.Is(err, gdpr.ErrNoKey) {
		t.Fatalf("Key of an unknown subject: %v", err)
	}
	k1, _ := m.Create(ctx, "s")
	k2, _ := m.Create(ctx, "s")
	if k1.ID != k2.ID || !bytes.Equal(k1.Material, k2.Material) || len(k1.Material) != gdpr.KeySize {
		t.Fatal("Create is not idempotent")
	}
}

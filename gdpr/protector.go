package gdpr

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"time"

	"github.com/stele-dev/stele/codec"
)

// Options tunes a Protector. A nil *Options means all defaults.
type Options struct {
	// Timeout bounds the key-store calls of Marshal and Unmarshal, which a
	// codec.Registry calls without a context. Defaults to 5s.
	Timeout time.Duration
	// CacheTTL, when positive, keeps keys (and the absence of one) in memory
	// that long, saving a key-store read per event. A process then still
	// reads a forgotten subject's data, and still writes with its deleted
	// key (data that is then unreadable at once), for up to CacheTTL after
	// the forget; Evict drops one subject at once. Defaults to 0: every
	// Marshal and Unmarshal reads the keys it needs (once per subject).
	CacheTTL time.Duration
	// RandomNonces seals with random nonces instead of synthetic ones. Then
	// encoding the same event twice gives different bytes, so an append
	// retried with re-encoded events (aggregate.Repository.Save after an
	// unclear error) is refused as an idempotency mismatch instead of being
	// recognised. Synthetic nonces (the default) reveal only that two
	// values of one subject's field are equal.
	RandomNonces bool
}

// maxCached bounds the key cache; past it the cache starts over.
const maxCached = 10_000

// Protector is a codec.Codec that encrypts the personal fields of a value
// (see TagName) with their subject's key before handing it to the codec it
// wraps, and decrypts them after decoding. A subject without a key gets one
// on first encode. A value whose key is gone decodes as Erased (nil for
// []byte), without error.
//
// Errors: encoding fails when a personal field has data but no subject,
// or the key store fails. Decoding fails when the key store fails (never
// Erased for an outage), or an encrypted value is malformed or does not
// authenticate (it was altered); codec.Registry reports those as
// codec.ErrUndecodable. Plaintext in a personal field (stored before the
// Protector was used) decodes as is.
type Protector struct {
	inner codec.Codec
	keys  KeyStore
	opts  Options

	mu    sync.Mutex
	cache map[string]cachedKey
}

type cachedKey struct {
	sealer *sealer // nil: the subject had no key
	at     time.Time
}

var _ codec.Codec = (*Protector)(nil)

// NewProtector returns a Protector over inner (nil means codec.JSON) with
// keys from keys. Give it to codec.NewRegistry: only registries made with it
// encrypt.
func NewProtector(inner codec.Codec, keys KeyStore, opts *Options) (*Protector, error) {
	if keys == nil {
		return nil, errors.New("gdpr: NewProtector: nil KeyStore")
	}
	if inner == nil {
		inner = codec.JSON
	}
	p := &Protector{inner: inner, keys: keys, cache: map[string]cachedKey{}}
	if opts != nil {
		p.opts = *opts
	}
	if p.opts.Timeout <= 0 {
		p.opts.Timeout = 5 * time.Second
	}
	return p, nil
}

// ContentType is the wrapped codec's: events stored before and after
// protection was turned on are read by the same registry.
func (p *Protector) ContentType() string { return p.inner.ContentType() }

// Marshal encrypts v's personal fields and encodes the result; v itself is
// not changed.
func (p *Protector) Marshal(v any) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), p.opts.Timeout)
	defer cancel()
	return p.MarshalContext(ctx, v)
}

// Unmarshal decodes data into v and decrypts its personal fields.
func (p *Protector) Unmarshal(data []byte, v any) error {
	ctx, cancel := context.WithTimeout(context.Background(), p.opts.Timeout)
	defer cancel()
	return p.UnmarshalContext(ctx, data, v)
}

// MarshalContext is Marshal with the key-store calls under ctx.
func (p *Protector) MarshalContext(ctx context.Context, v any) ([]byte, error) {
	rv := reflect.ValueOf(v)
	ptr := false
	for rv.Kind() == reflect.Pointer && !rv.IsNil() {
		rv, ptr = rv.Elem(), true
	}
	if rv.Kind() != reflect.Struct {
		return p.inner.Marshal(v)
	}
	plan, err := planFor(rv.Type())
	if err != nil {
		return nil, err
	}
	if plan.empty() {
		return p.inner.Marshal(v)
	}
	cp := reflect.New(rv.Type()).Elem()
	cp.Set(rv)
	s := session{p: p, ctx: ctx, encrypt: true}
	if err := s.walk(cp, plan, rv.Type().String()); err != nil {
		return nil, err
	}
	if ptr { // keep pointer-receiver marshalers working
		return p.inner.Marshal(cp.Addr().Interface())
	}
	return p.inner.Marshal(cp.Interface())
}

// UnmarshalContext is Unmarshal with the key-store calls under ctx.
func (p *Protector) UnmarshalContext(ctx context.Context, data []byte, v any) error {
	if err := p.inner.Unmarshal(data, v); err != nil {
		return err
	}
	rv := reflect.ValueOf(v)
	for rv.Kind() == reflect.Pointer && !rv.IsNil() {
		rv = rv.Elem()
	}
	if rv.Kind() != reflect.Struct || !rv.CanSet() {
		return nil
	}
	plan, err := planFor(rv.Type())
	if err != nil || plan.empty() {
		return err
	}
	s := session{p: p, ctx: ctx}
	return s.walk(rv, plan, rv.Type().String())
}

// Evict drops subject from the key cache, so this process neither reads nor
// writes with a key forgotten elsewhere a moment ago.
func (p *Protector) Evict(subject string) {
	p.mu.Lock()
	delete(p.cache, subject)
	p.mu.Unlock()
}

// sealer returns the subject's sealer; with create a key is made if there
// is none, without it a subject without a key gives nil.
func (p *Protector) sealer(ctx context.Context, subject string, create bool) (*sealer, error) {
	if p.opts.CacheTTL > 0 {
		p.mu.Lock()
		c, ok := p.cache[subject]
		p.mu.Unlock()
		if ok && time.Since(c.at) < p.opts.CacheTTL && (c.sealer != nil || !create) {
			return c.sealer, nil
		}
	}
	k, err := p.keys.Key(ctx, subject)
	if errors.Is(err, ErrNoKey) && create {
		k, err = p.keys.Create(ctx, subject)
	}
	var sl *sealer
	switch {
	case errors.Is(err, ErrNoKey) && !create:
	case err != nil:
		return nil, fmt.Errorf("gdpr: key of subject %q: %w", subject, err)
	default:
		if sl, err = newSealer(k); err != nil {
			return nil, fmt.Errorf("gdpr: key of subject %q: %w", subject, err)
		}
	}
	if p.opts.CacheTTL > 0 {
		p.mu.Lock()
		if len(p.cache) >= maxCached {
			clear(p.cache)
		}
		p.cache[subject] = cachedKey{sealer: sl, at: time.Now()}
		p.mu.Unlock()
	}
	return sl, nil
}

// session is one Marshal or Unmarshal: each subject's key is read once.
type session struct {
	p       *Protector
	ctx     context.Context
	encrypt bool
	sealers map[string]*sealer
}

func (s *session) sealerFor(subject string) (*sealer, error) {
	if sl, ok := s.sealers[subject]; ok {
		return sl, nil
	}
	sl, err := s.p.sealer(s.ctx, subject, s.encrypt)
	if err != nil {
		return nil, err
	}
	if s.sealers == nil {
		s.sealers = map[string]*sealer{}
	}
	s.sealers[subject] = sl
	return sl, nil
}

// walk encrypts or decrypts the personal fields of struct v (addressable).
// Encrypting, v is a private copy: whatever it shares with the caller's
// value (pointers, slices) is copied before it is changed.
func (s *session) walk(v reflect.Value, plan *typePlan, path string) error {
	for _, f := range plan.fields {
		fv := v.Field(f.index)
		if !fv.CanSet() {
			return fmt.Errorf("gdpr: %s.%s: cannot be set", path, f.name)
		}
		if err := s.field(v, fv, f); err != nil {
			return fmt.Errorf("%s.%s: %w", path, f.name, err)
		}
	}
	for _, n := range plan.nested {
		fv := v.Field(n.index)
		at := path + "." + n.name
		switch n.shape {
		case shapeStruct:
			if err := s.walk(fv, n.plan, at); err != nil {
				return err
			}
		case shapePtr:
			if err := s.walkPtr(fv, n.plan, at); err != nil {
				return err
			}
		case shapeSlice, shapeArray:
			if fv.Len() == 0 {
				continue
			}
			if s.encrypt && n.shape == shapeSlice {
				if !fv.CanSet() {
					return fmt.Errorf("gdpr: %s: cannot be set", at)
				}
				cp := reflect.MakeSlice(fv.Type(), fv.Len(), fv.Len())
				reflect.Copy(cp, fv)
				fv.Set(cp)
			}
			for i := range fv.Len() {
				ev, ep := fv.Index(i), fmt.Sprintf("%s[%d]", at, i)
				var err error
				if n.elemPtr {
					err = s.walkPtr(ev, n.plan, ep)
				} else {
					err = s.walk(ev, n.plan, ep)
				}
				if err != nil {
					return err
				}
			}
		}
	}
	return nil
}

func (s *session) walkPtr(fv reflect.Value, plan *typePlan, path string) error {
	if fv.IsNil() {
		return nil
	}
	if s.encrypt {
		if !fv.CanSet() {
			return fmt.Errorf("gdpr: %s: cannot be set", path)
		}
		cp := reflect.New(fv.Type().Elem())
		cp.Elem().Set(fv.Elem())
		fv.Set(cp)
	}
	return s.walk(fv.Elem(), plan, path)
}

// subject returns the subject id of field f of struct v.
func (s *session) subject(v reflect.Value, f personalField) (string, error) {
	sv, err := v.FieldByIndexErr(f.subject)
	if err != nil {
		return "", fmt.Errorf("subject field %s: %w", f.subjectName, err)
	}
	return f.format(sv), nil
}

// field encrypts or decrypts one personal field fv of struct v.
func (s *session) field(v, fv reflect.Value, f personalField) error {
	switch f.kind {
	case kindString:
		out, err := s.value(v, f, fv.String())
		if err == nil {
			fv.SetString(out.text(Erased))
		}
		return err
	case kindBytes:
		if fv.Len() == 0 {
			return nil
		}
		out, err := s.value(v, f, string(fv.Bytes()))
		switch {
		case err != nil:
			return err
		case out.erased:
			fv.Set(reflect.Zero(fv.Type()))
		default:
			fv.SetBytes([]byte(out.s))
		}
		return nil
	case kindStringPtr:
		if fv.IsNil() {
			return nil
		}
		out, err := s.value(v, f, fv.Elem().String())
		if err != nil {
			return err
		}
		np := reflect.New(fv.Type().Elem())
		np.Elem().SetString(out.text(Erased))
		fv.Set(np)
		return nil
	case kindStrings:
		if fv.Len() == 0 {
			return nil
		}
		ns := reflect.MakeSlice(fv.Type(), fv.Len(), fv.Len())
		for i := range fv.Len() {
			out, err := s.value(v, f, fv.Index(i).String())
			if err != nil {
				return fmt.Errorf("[%d]: %w", i, err)
			}
			ns.Index(i).SetString(out.text(Erased))
		}
		fv.Set(ns)
		return nil
	}
	return fmt.Errorf("gdpr: unknown kind %d", f.kind)
}

// result is what became of one stored value.
type result struct {
	s      string
	erased bool // its key is gone
}

func (r result) text(placeholder string) string {
	if r.erased {
		return placeholder
	}
	return r.s
}

// value encrypts or decrypts one stored value of field f of struct v.
// Empty values stay empty: there is nothing to protect.
func (s *session) value(v reflect.Value, f personalField, in string) (result, error) {
	if in == "" {
		return result{}, nil
	}
	if s.encrypt {
		subject, err := s.subject(v, f)
		if err != nil {
			return result{}, err
		}
		if subject == "" {
			return result{}, fmt.Errorf("%w (field %s is empty)", ErrNoSubject, f.subjectName)
		}
		sl, err := s.sealerFor(subject)
		if err != nil {
			return result{}, err
		}
		out, err := sl.seal(subject, []byte(in), s.p.opts.RandomNonces)
		return result{s: out}, err
	}
	keyID, blob, ok, err := parseEnvelope(in)
	switch {
	case !ok:
		return result{s: in}, nil // plaintext from before protection
	case err != nil:
		return result{}, err
	}
	subject, err := s.subject(v, f)
	switch {
	case err != nil:
		return result{}, err
	case ValidateSubject(subject) != nil:
		return result{erased: true}, nil // no key can exist for it
	}
	sl, err := s.sealerFor(subject)
	if err != nil {
		return result{}, err
	}
	if sl == nil || sl.keyID != keyID {
		return result{erased: true}, nil // forgotten (a later key has another id)
	}
	pt, err := sl.open(subject, blob)
	if err != nil {
		return result{}, err
	}
	return result{s: string(pt)}, nil
}

package codec

import (
	"fmt"
	"mime"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"unicode"
	"unicode/utf8"

	"github.com/stele-dev/stele/eventstore"
)

// MaxNameBytes is the longest event name accepted: the event store's limit on
// an event type.
const MaxNameBytes = 255

// Registry maps Go event types to stable names and schema versions, and runs
// upcasters so old events are read as the current type. Register everything
// at program start; after that a Registry is safe for concurrent use.
type Registry struct {
	codec Codec
	media string // the codec's media type without parameters, lower case

	mu        sync.RWMutex
	byName    map[string]*entry
	byType    map[reflect.Type]*entry
	renames   map[string]string                                    // old name → newer name
	upcasters map[string]map[int]func(data []byte) ([]byte, error) // name → from → step
}

type entry struct {
	name        string
	version     int
	goType      reflect.Type
	contentType string // codec content type plus "; v=N", built once
	decode      func(c Codec, data []byte) (any, error)
}

// NewRegistry returns an empty Registry that encodes with c. A nil c means JSON.
func NewRegistry(c Codec) *Registry {
	if c == nil {
		c = JSON
	}
	return &Registry{
		codec:     c,
		media:     mediaType(c.ContentType()),
		byName:    map[string]*entry{},
		byType:    map[reflect.Type]*entry{},
		renames:   map[string]string{},
		upcasters: map[string]map[int]func([]byte) ([]byte, error){},
	}
}

// mediaType is ct without parameters, in lower case.
func mediaType(ct string) string {
	if mt, _, err := mime.ParseMediaType(ct); err == nil {
		return mt
	}
	// A custom codec with an unusual content type: compare what we can.
	base, _, _ := strings.Cut(ct, ";")
	return strings.ToLower(strings.TrimSpace(base))
}

// Register records T under name at schema version version, the version of
// T's current shape (1 for a new event). It refuses, with a
// *RegistrationError, an invalid name, a name or type registered twice, a
// name already renamed to another, a version below 1, an interface or pointer
// type (register the struct; Encode takes a value or a pointer), or a version
// at or below the start of an already registered upcaster.
func Register[T any](r *Registry, name string, version int) error {
	t := reflect.TypeFor[T]()
	refuse := func(format string, args ...any) error {
		return &RegistrationError{Name: name, GoType: t, Reason: fmt.Sprintf(format, args...)}
	}
	if r == nil {
		return refuse("nil registry")
	}
	if reason := invalidName(name); reason != "" {
		return refuse("%s", reason)
	}
	if version < 1 {
		return refuse("schema version %d; versions start at 1", version)
	}
	switch t.Kind() {
	case reflect.Interface:
		return refuse("an interface type has no shape to decode into")
	case reflect.Pointer:
		// Decode returns values; a pointer type would make Encode ambiguous.
		return refuse("register %v, not a pointer to it", t.Elem())
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	if e, ok := r.byName[name]; ok {
		return refuse("name already registered for %v", e.goType)
	}
	if e, ok := r.byType[t]; ok {
		return refuse("type already registered as %q", e.name)
	}
	if to, ok := r.renames[name]; ok {
		return refuse("name was renamed to %q; stored events of it decode as that", to)
	}
	for from := range r.upcasters[name] {
		if from >= version {
			return refuse("an upcaster from v%d is registered, so the current version must be above %d", from, from)
		}
	}
	e := &entry{
		name:        name,
		version:     version,
		goType:      t,
		contentType: r.codec.ContentType() + "; v=" + strconv.Itoa(version),
		decode: func(c Codec, data []byte) (any, error) {
			var v T
			if err := c.Unmarshal(data, &v); err != nil {
				return nil, err
			}
			return v, nil
		},
	}
	r.byName[name] = e
	r.byType[t] = e
	return nil
}

// MustRegister is Register that panics on error, for package init.
func MustRegister[T any](r *Registry, name string, version int) {
	if err := Register[T](r, name, version); err != nil {
		panic(err)
	}
}

// invalidName says what is wrong with name, or "" if nothing is. Names follow
// the event store's rules for an event type, without white space, so that any
// registered name can be appended and read back unchanged.
func invalidName(name string) string {
	switch {
	case name == "":
		return "empty name"
	case len(name) > MaxNameBytes:
		return fmt.Sprintf("name of %d bytes, more than %d", len(name), MaxNameBytes)
	case !utf8.ValidString(name):
		return "name is not valid UTF-8"
	}
	for i, c := range name {
		if unicode.IsSpace(c) || !unicode.IsPrint(c) {
			return fmt.Sprintf("white space or unprintable character %U at byte %d", c, i)
		}
	}
	return ""
}

// Upcast registers fn as the step that rewrites a payload of name stored at
// schema version from into version from+1. Steps work on raw bytes in the
// codec's format, so the Go types of old versions need not exist any more.
// One step per version: an event stored at v1 of a type now at v3 runs the
// steps from 1 and from 2, in that order.
//
// fn receives its own copy of the bytes. It must not assume the payload is
// well formed: return an error, and Decode reports ErrUndecodable.
func (r *Registry) Upcast(name string, from int, fn func(data []byte) ([]byte, error)) error {
	refuse := func(format string, args ...any) error {
		return &RegistrationError{Name: name, Reason: fmt.Sprintf(format, args...)}
	}
	if reason := invalidName(name); reason != "" {
		return refuse("%s", reason)
	}
	if from < 1 {
		return refuse("upcaster from v%d; versions start at 1", from)
	}
	if fn == nil {
		return refuse("nil upcaster from v%d", from)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if to, ok := r.renames[name]; ok {
		return refuse("name was renamed to %q; register its upcasters under that name", to)
	}
	if e, ok := r.byName[name]; ok && from >= e.version {
		return refuse("upcaster from v%d would go past the current version %d", from, e.version)
	}
	if _, ok := r.upcasters[name][from]; ok {
		return refuse("upcaster from v%d registered twice", from)
	}
	if r.upcasters[name] == nil {
		r.upcasters[name] = map[int]func([]byte) ([]byte, error){}
	}
	r.upcasters[name][from] = fn
	return nil
}

// Rename says events stored under oldName are now name. They keep their
// stored schema versions, and the upcasters registered for name run from
// there, so the versions of oldName and name are one sequence. Renames chain:
// after Rename("a", "b") and Rename("b", "c"), events stored as "a" decode as
// "c". name need not be registered yet; Decode reports ErrUnknownType if the
// chain never reaches a registered name.
func (r *Registry) Rename(oldName, name string) error {
	refuse := func(format string, args ...any) error {
		return &RegistrationError{Name: oldName, Reason: fmt.Sprintf(format, args...)}
	}
	if reason := invalidName(oldName); reason != "" {
		return refuse("%s", reason)
	}
	if reason := invalidName(name); reason != "" {
		return refuse("new name %q: %s", name, reason)
	}
	if oldName == name {
		return refuse("renamed to itself")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if e, ok := r.byName[oldName]; ok {
		return refuse("still registered for %v; an old name cannot also be current", e.goType)
	}
	if to, ok := r.renames[oldName]; ok {
		return refuse("already renamed to %q", to)
	}
	if len(r.upcasters[oldName]) > 0 {
		return refuse("has upcasters; register them under %q, where they run after the rename", name)
	}
	for n, hops := name, 0; hops <= len(r.renames); hops++ {
		to, ok := r.renames[n]
		if !ok {
			break
		}
		if to == oldName {
			return refuse("renaming to %q would make a cycle", name)
		}
		n = to
	}
	r.renames[oldName] = name
	return nil
}

// Encode returns the event data for v, a value of a registered type or a
// pointer to one: Type is the registered name, Data the codec's bytes, and
// ContentType the codec's content type with the schema version, always
// explicit ("application/json; v=1"). ID and Metadata are left zero for the
// caller to fill.
func (r *Registry) Encode(v any) (eventstore.EventData, error) {
	e, val, err := r.lookup(v)
	if err != nil {
		return eventstore.EventData{}, err
	}
	data, err := r.codec.Marshal(val)
	if err != nil {
		return eventstore.EventData{}, fmt.Errorf("codec: encoding %q: %w", e.name, err)
	}
	return eventstore.EventData{Type: e.name, Data: data, ContentType: e.contentType}, nil
}

// Name returns the registered name of v's type; v may be a value or a pointer.
func (r *Registry) Name(v any) (string, bool) {
	e, _, err := r.lookup(v)
	if err != nil {
		return "", false
	}
	return e.name, true
}

// lookup finds v's entry and returns the value to marshal (v itself, or what
// a pointer v points to).
func (r *Registry) lookup(v any) (*entry, any, error) {
	if v == nil {
		return nil, nil, fmt.Errorf("codec: encoding <nil>: %w", ErrNotRegistered)
	}
	t := reflect.TypeOf(v)
	r.mu.RLock()
	e, ok := r.byType[t]
	if !ok && t.Kind() == reflect.Pointer {
		e, ok = r.byType[t.Elem()]
	}
	r.mu.RUnlock()
	if !ok {
		return nil, nil, fmt.Errorf("codec: encoding %v: %w", t, ErrNotRegistered)
	}
	if e.goType != t { // a pointer to the registered type
		p := reflect.ValueOf(v)
		if p.IsNil() {
			return nil, nil, fmt.Errorf("codec: encoding %q: nil %v", e.name, t)
		}
		return e, p.Elem().Interface(), nil
	}
	return e, v, nil
}

// Decode turns a stored event into a value of its current Go type (the value,
// not a pointer). It follows renames and runs the upcasters from the stored
// schema version to the current one. A content type without "v=" means
// version 1; an empty one means the codec's own at version 1.
//
// Every error is a *DecodeError naming the event, and matches one of
// ErrUnknownType, ErrUndecodable, ErrNoUpcaster or ErrFutureVersion.
func (r *Registry) Decode(e eventstore.Event) (any, error) {
	fail := func(schema int, err error) error {
		return &DecodeError{StreamID: e.StreamID, Version: e.Version, Type: e.Type, SchemaVersion: schema, Err: err}
	}
	schema, err := r.schemaVersion(e.ContentType)
	if err != nil {
		return nil, fail(0, err)
	}

	// Gather what to run under the lock, run it outside: upcasters and
	// codecs are user code.
	r.mu.RLock()
	name := r.resolve(e.Type)
	ent, ok := r.byName[name]
	var steps []func([]byte) ([]byte, error)
	missing := 0
	if ok && schema < ent.version {
		steps = make([]func([]byte) ([]byte, error), 0, ent.version-schema)
		for from := schema; from < ent.version; from++ {
			fn, found := r.upcasters[name][from]
			if !found {
				missing = from
				break
			}
			steps = append(steps, fn)
		}
	}
	r.mu.RUnlock()

	switch {
	case !ok && name != e.Type:
		return nil, fail(schema, fmt.Errorf("%w: renamed to %q, which is not registered", ErrUnknownType, name))
	case !ok:
		return nil, fail(schema, ErrUnknownType)
	case schema > ent.version:
		return nil, fail(schema, fmt.Errorf("%w: %q is registered at v%d", ErrFutureVersion, name, ent.version))
	case missing > 0:
		return nil, fail(schema, fmt.Errorf("%w: no step of %q from v%d to v%d", ErrNoUpcaster, name, missing, missing+1))
	}

	data := e.Data
	if len(steps) > 0 {
		// The store may hand out its own buffer; an upcaster that edits in
		// place must not change what the store holds.
		data = append([]byte(nil), data...)
	}
	for i, step := range steps {
		from := schema + i
		if data, err = step(data); err != nil {
			return nil, fail(schema, fmt.Errorf("%w: upcasting %q from v%d to v%d: %w", ErrUndecodable, name, from, from+1, err))
		}
	}
	v, err := ent.decode(r.codec, data)
	if err != nil {
		return nil, fail(schema, fmt.Errorf("%w: %w", ErrUndecodable, err))
	}
	return v, nil
}

// resolve follows renames from a stored name to the newest one. Rename
// refuses cycles; the bound is a second guard. Callers hold r.mu.
func (r *Registry) resolve(name string) string {
	for hops := 0; hops <= len(r.renames); hops++ {
		to, ok := r.renames[name]
		if !ok {
			break
		}
		name = to
	}
	return name
}

// schemaVersion reads the "v" parameter of a stored content type and checks
// that the media type is the codec's: feeding protobuf to a JSON decoder
// must fail loudly, not decode zero values.
func (r *Registry) schemaVersion(contentType string) (int, error) {
	if strings.TrimSpace(contentType) == "" {
		return 1, nil
	}
	mt, params, err := mime.ParseMediaType(contentType)
	if err != nil {
		return 0, fmt.Errorf("%w: content type %q: %w", ErrUndecodable, contentType, err)
	}
	if mt != r.media {
		return 0, fmt.Errorf("%w: content type %q, the codec reads %q", ErrUndecodable, contentType, r.media)
	}
	s, ok := params["v"]
	if !ok {
		return 1, nil
	}
	if s == "" || strings.TrimLeft(s, "0123456789") != "" {
		return 0, fmt.Errorf("%w: content type %q: schema version %q is not a positive integer", ErrUndecodable, contentType, s)
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		return 0, fmt.Errorf("%w: content type %q: schema version %q is not a positive integer", ErrUndecodable, contentType, s)
	}
	return n, nil
}

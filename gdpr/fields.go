package gdpr

import (
	"errors"
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"sync"
)

// TagName is the struct tag that marks personal data:
//
//	Email string `json:"email" personal:"subject=CustomerID"`
//
// subject names the field, of the same struct (promoted fields of embedded
// structs count), that holds the data subject's id: a string, an integer or
// a value with a String method (such as uuid.UUID). The subject field itself
// is stored in the clear: use an opaque id, not an e-mail address.
//
// A tagged field must be a string, []byte, *string or []string (named types
// of those kinds too) and exported. Fields of nested structs, of pointers to
// structs and of slices and arrays of those are found as well; their
// subject is a field of their own struct. Maps are not searched.
const TagName = "personal"

// ErrNoSubject: a personal field holds data but its subject field is empty.
var ErrNoSubject = errors.New("gdpr: personal data without a subject id")

// ErrBadTag: a personal tag that cannot be used, found when a type is first
// encoded or decoded (or checked with Check).
var ErrBadTag = errors.New("gdpr: invalid personal tag")

type valueKind int

const (
	kindString valueKind = iota + 1
	kindBytes
	kindStringPtr
	kindStrings
)

type personalField struct {
	index       int
	name        string
	kind        valueKind
	subject     []int // index path of the subject field
	subjectName string
	format      func(reflect.Value) string
}

type shape int

const (
	shapeStruct shape = iota + 1
	shapePtr
	shapeSlice
	shapeArray
)

type nestedField struct {
	index   int
	name    string
	shape   shape
	elemPtr bool // slice or array of pointers to structs
	plan    *typePlan
}

// typePlan lists where a struct type holds personal data.
type typePlan struct {
	fields []personalField
	nested []nestedField
	err    error
	done   bool
}

// empty reports whether values of the type hold no personal data at all.
func (p *typePlan) empty() bool { return len(p.fields) == 0 && len(p.nested) == 0 }

var plans sync.Map // reflect.Type → *typePlan

// planFor returns the plan of struct type t, built once.
func planFor(t reflect.Type) (*typePlan, error) {
	if p, ok := plans.Load(t); ok {
		return p.(*typePlan), p.(*typePlan).err
	}
	building := map[reflect.Type]*typePlan{}
	p := buildPlan(t, building)
	for bt, bp := range building {
		if bp.err == nil || bt == t {
			plans.LoadOrStore(bt, bp)
		}
	}
	return p, p.err
}

var stringerType = reflect.TypeFor[fmt.Stringer]()

func buildPlan(t reflect.Type, building map[reflect.Type]*typePlan) *typePlan {
	if p, ok := building[t]; ok {
		return p // in progress (a recursive type) or built in this pass
	}
	if p, ok := plans.Load(t); ok {
		return p.(*typePlan)
	}
	p := &typePlan{}
	building[t] = p
	defer func() { p.done = true }()
	fail := func(f reflect.StructField, format string, args ...any) *typePlan {
		p.err = fmt.Errorf("%w: %v.%s: %s", ErrBadTag, t, f.Name, fmt.Sprintf(format, args...))
		p.fields, p.nested = nil, nil
		return p
	}
	for i := range t.NumField() {
		f := t.Field(i)
		tag, tagged := f.Tag.Lookup(TagName)
		if tagged {
			if !f.IsExported() {
				return fail(f, "an unexported field is never stored; tag exported fields only")
			}
			kind := kindOf(f.Type)
			if kind == 0 {
				return fail(f, "type %v; personal data must be a string, []byte, *string or []string", f.Type)
			}
			name, err := parseTag(tag)
			if err != nil {
				return fail(f, "%v", err)
			}
			sf, ok := t.FieldByName(name)
			if !ok {
				return fail(f, "subject field %q not found in %v", name, t)
			}
			if !sf.IsExported() {
				return fail(f, "subject field %q is unexported", name)
			}
			if _, personal := sf.Tag.Lookup(TagName); personal {
				return fail(f, "subject field %q is itself personal data; the subject id is stored in the clear", name)
			}
			format := subjectFormat(sf.Type)
			if format == nil {
				return fail(f, "subject field %q has type %v; want a string, an integer or a fmt.Stringer", name, sf.Type)
			}
			p.fields = append(p.fields, personalField{index: i, name: f.Name, kind: kind, subject: sf.Index, subjectName: name, format: format})
			continue
		}
		if !f.IsExported() && !f.Anonymous {
			continue // the codec does not see it
		}
		st, sh, elemPtr := nestedShape(f.Type)
		if st == nil {
			continue
		}
		sub := buildPlan(st, building)
		if sub.err != nil {
			p.err = fmt.Errorf("%v.%s: %w", t, f.Name, sub.err)
			p.fields, p.nested = nil, nil
			return p
		}
		if !sub.done || !sub.empty() { // a type still being built may hold some: look
			p.nested = append(p.nested, nestedField{index: i, name: f.Name, shape: sh, elemPtr: elemPtr, plan: sub})
		}
	}
	return p
}

func kindOf(t reflect.Type) valueKind {
	switch {
	case t.Kind() == reflect.String:
		return kindString
	case t.Kind() == reflect.Slice && t.Elem().Kind() == reflect.Uint8:
		return kindBytes
	case t.Kind() == reflect.Pointer && t.Elem().Kind() == reflect.String:
		return kindStringPtr
	case t.Kind() == reflect.Slice && t.Elem().Kind() == reflect.String:
		return kindStrings
	}
	return 0
}

// nestedShape says whether values of t may hold structs to search.
func nestedShape(t reflect.Type) (reflect.Type, shape, bool) {
	switch t.Kind() {
	case reflect.Struct:
		return t, shapeStruct, false
	case reflect.Pointer:
		if t.Elem().Kind() == reflect.Struct {
			return t.Elem(), shapePtr, false
		}
	case reflect.Slice, reflect.Array:
		e := t.Elem()
		sh := shapeSlice
		if t.Kind() == reflect.Array {
			sh = shapeArray
		}
		switch {
		case e.Kind() == reflect.Struct:
			return e, sh, false
		case e.Kind() == reflect.Pointer && e.Elem().Kind() == reflect.Struct:
			return e.Elem(), sh, true
		}
	}
	return nil, 0, false
}

func parseTag(tag string) (string, error) {
	var subject string
	for opt := range strings.SplitSeq(tag, ",") {
		opt = strings.TrimSpace(opt)
		k, v, _ := strings.Cut(opt, "=")
		switch {
		case k == "subject" && v != "" && subject == "":
			subject = v
		case k == "subject":
			return "", fmt.Errorf("tag %q: want one subject=FieldName", tag)
		default:
			return "", fmt.Errorf("tag %q: unknown option %q", tag, opt)
		}
	}
	if subject == "" {
		return "", fmt.Errorf("tag %q: want subject=FieldName", tag)
	}
	return subject, nil
}

func subjectFormat(t reflect.Type) func(reflect.Value) string {
	switch t.Kind() {
	case reflect.String:
		return reflect.Value.String
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return func(v reflect.Value) string { return strconv.FormatInt(v.Int(), 10) }
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return func(v reflect.Value) string { return strconv.FormatUint(v.Uint(), 10) }
	case reflect.Pointer, reflect.Interface:
		return nil // may be nil
	}
	if t.Implements(stringerType) {
		return func(v reflect.Value) string { return v.Interface().(fmt.Stringer).String() }
	}
	return nil
}

// Check reports whether the personal tags of v's type (a struct or a
// pointer to one) are usable, and where not. Encoding and decoding check the
// same; call Check at start-up, or in a test, to fail early.
func Check(v any) error {
	t := reflect.TypeOf(v)
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == nil || t.Kind() != reflect.Struct {
		return nil
	}
	_, err := planFor(t)
	return err
}

package eventstore

import (
	"encoding/json"
	"strings"
)

// DecodeMetadata reads what EncodeMetadata wrote (or PostgreSQL's jsonb
// rendering of it). It runs once per event read, so the usual shape (string
// fields, a "keys" object of strings, no escapes) is parsed by hand; anything
// else goes to encoding/json.
func DecodeMetadata(b []byte) (Metadata, error) {
	var m Metadata
	if len(b) == 0 {
		return m, nil
	}
	if p := (metaParser{s: string(b)}); p.parse(&m) {
		return m, nil
	}
	m = Metadata{}
	err := json.Unmarshal(b, &m)
	return m, err
}

type metaParser struct {
	s string
	i int
}

func (p *metaParser) ws() {
	for p.i < len(p.s) && (p.s[p.i] == ' ' || p.s[p.i] == '\n' || p.s[p.i] == '\t' || p.s[p.i] == '\r') {
		p.i++
	}
}

func (p *metaParser) byte(c byte) bool {
	p.ws()
	if p.i < len(p.s) && p.s[p.i] == c {
		p.i++
		return true
	}
	return false
}

// str reads a string without escapes; ok is false for anything else.
func (p *metaParser) str() (string, bool) {
	if !p.byte('"') {
		return "", false
	}
	end := strings.IndexByte(p.s[p.i:], '"')
	if end < 0 {
		return "", false
	}
	v := p.s[p.i : p.i+end]
	if strings.IndexByte(v, '\\') >= 0 {
		return "", false
	}
	p.i += end + 1
	return v, true
}

// object reads {"k": "v", ...} calling set for each pair.
func (p *metaParser) object(set func(k string) bool) bool {
	if !p.byte('{') {
		return false
	}
	if p.byte('}') {
		return true
	}
	for {
		k, ok := p.str()
		if !ok || !p.byte(':') || !set(k) {
			return false
		}
		if p.byte('}') {
			return true
		}
		if !p.byte(',') {
			return false
		}
	}
}

func (p *metaParser) parse(m *Metadata) bool {
	ok := p.object(func(k string) bool {
		if k == "keys" {
			m.Keys = make(map[string]string)
			return p.object(func(k string) bool {
				v, ok := p.str()
				m.Keys[k] = v
				return ok
			})
		}
		v, ok := p.str()
		switch k {
		case "correlation_id":
			m.CorrelationID = v
		case "causation_id":
			m.CausationID = v
		case "traceparent":
			m.TraceParent = v
		case "tracestate":
			m.TraceState = v
		default:
			return false
		}
		return ok
	})
	p.ws()
	return ok && p.i == len(p.s)
}

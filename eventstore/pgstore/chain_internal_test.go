package pgstore

import (
	"encoding/hex"
	"testing"
)

// TestChainFormatIsStable pins the hash chain's encoding: a chain sealed by
// an earlier release must verify with this one, so tenant ”s events and
// seals hash exactly as before tenants existed (the values were computed by
// the release before migration 0009), and a tenant's never hash like them.
func TestChainFormatIsStable(t *testing.T) {
	e := chainEvent{streamID: "order-1", category: "order", eventID: "6f1c7c9e-8a53-4a43-9d0e-2d1d5c3f7b11", typ: "placed",
		contentType: "application/json", meta: `{"correlation_id": "c-1"}`, version: 2, micros: 1764500000123456, data: []byte(`{"n":1}`)}
	h := e.hash(zeroHash)
	a := chainAudit{id: 7, micros: 1764500000123456, actor: "alice", role: "postgres", action: "archive", target: "order-1", detailString: `{"x": 1}`}
	ah := a.hash(zeroHash)
	spans := []sealSpan{{streamID: "order-1", first: 1, last: 2, head: h}, {streamID: "order-2", first: 1, last: 1, head: ah}}
	d := sealDigest(3, h, spans, sealSpan{first: 4, last: 5, head: ah})
	for what, got := range map[string][]byte{
		"event":  h,
		"audit":  ah,
		"digest": d,
	} {
		want := map[string]string{
			"event":  "86a4ba0986a8c072e1deb1e4ea03e71c654aac849f8357ac834d59324a60d760",
			"audit":  "2999b09d3b96547cb2fec6c8e7611138543197330f72d6ef0dc80f9ddeceb565",
			"digest": "e163df18b6eee4165ab12a3fa9d2d893ac8f8cdee7744eb0b9fccdc0227a3d03",
		}[what]
		if hex.EncodeToString(got) != want {
			t.Errorf("%s hash %x, want %s as sealed before tenants", what, got, want)
		}
	}

	// The same event and spans of a tenant hash differently.
	e.tenant = "acme"
	if th := e.hash(zeroHash); hex.EncodeToString(th) == hex.EncodeToString(h) {
		t.Error("a tenant's event hashes like tenant ''s")
	}
	spans[1].tenant = "acme"
	if td := sealDigest(3, h, spans, sealSpan{first: 4, last: 5, head: ah}); hex.EncodeToString(td) == hex.EncodeToString(d) {
		t.Error("a seal covering a tenant's stream digests like one that does not")
	}
}

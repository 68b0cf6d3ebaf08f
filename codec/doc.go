// Package codec turns Go event values into stored event data and back.
//
// A Registry maps each Go event type to a stable name ("order.placed") and a
// schema version. The name, never Go's package path, is what the store keeps,
// so types can move between packages without breaking old events. Encode
// records the schema version in the content type ("application/json; v=2").
// Decode reads it back and runs upcasters, byte-to-byte steps registered with
// Upcast, so events written long ago are read as today's Go type.
//
// Minimal use:
//
//	reg := codec.NewRegistry(nil) // JSON
//	codec.MustRegister[OrderPlaced](reg, "order.placed", 1)
//
//	data, err := reg.Encode(OrderPlaced{SKU: "tea"})  // an eventstore.EventData to append
//	v, err := reg.Decode(event)                       // an OrderPlaced, as any
//
// Register types and upcasters at program start; after that a Registry is
// safe for concurrent use. See docs/schema-evolution.md for how to change an
// event's shape without breaking stored history.
package codec

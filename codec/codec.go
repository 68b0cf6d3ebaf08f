package codec

import "encoding/json"

// Codec turns values into bytes and back. JSON is the default; the interface
// is small enough for protobuf or Avro.
//
// Unmarshal must not keep or modify data after it returns: Decode hands it
// bytes owned by the event store.
type Codec interface {
	// ContentType is the media type written with every event, such as
	// "application/json". The Registry appends the schema version to it.
	ContentType() string
	Marshal(v any) ([]byte, error)
	Unmarshal(data []byte, v any) error
}

// JSON is the default Codec: encoding/json, content type "application/json".
//
// Its output is stored forever and compared byte for byte when an append is
// retried, so it stays plain json.Marshal.
var JSON Codec = jsonCodec{}

type jsonCodec struct{}

func (jsonCodec) ContentType() string                { return "application/json" }
func (jsonCodec) Marshal(v any) ([]byte, error)      { return json.Marshal(v) }
func (jsonCodec) Unmarshal(data []byte, v any) error { return json.Unmarshal(data, v) }

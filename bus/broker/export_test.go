package broker

// Names the external tests need to clean up after the conformance suite.
var (
	PGTableName  = pgTable
	NATSConsumer = natsConsumer
)

type NATSMarshaler = natsMarshaler

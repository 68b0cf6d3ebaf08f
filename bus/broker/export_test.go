package broker

// Names the external tests need to clean up after the conformance suite.
var (
	NATSStreamName = natsName
	AMQPQueueName  = amqpQueue
	PGTableName    = pgTable
	NATSConsumer   = natsConsumer
)

type NATSMarshaler = natsMarshaler

package broker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/IBM/sarama"
	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill-kafka/v3/pkg/kafka"
	"github.com/ThreeDotsLabs/watermill/message"
)

// kafkaNackResend is how long a nacked message waits before the subscriber
// hands it out again (the partition waits with it).
const kafkaNackResend = 100 * time.Millisecond

// saramaConfig is the client configuration shared by the producer, the
// consumers and the admin client.
func saramaConfig(cfg Config, timeout time.Duration) *sarama.Config {
	c := sarama.NewConfig()
	// Protocol 2.1 (Sarama's own default; Watermill's is 1.0): the baseline
	// Kafka 4 still serves after dropping older request versions (KIP-896).
	// The in-process test cluster (kfake) serves it.
	c.Version = sarama.V2_1_0_0
	c.ClientID = "stele"
	c.Net.DialTimeout = timeout
	if cfg.TLS != nil {
		c.Net.TLS.Enable = true
		c.Net.TLS.Config = cfg.TLS
	}
	c.Metadata.Retry.Max = 5
	c.Metadata.Retry.Backoff = 250 * time.Millisecond
	return c
}

// openKafka sets up watermill-kafka/v3: a sync producer that waits until
// every in-sync replica has the message (RequiredAcks WaitForAll) and
// retries, the partitioning marshaler (metadata PartitionKey is the record
// key, the UUID and metadata travel as headers), and per group a Sarama
// consumer group that starts at the oldest offset when it has none
// committed, marks a message consumed only when it is acked and commits the
// marks every second (so a crash redelivers up to a second's worth).
func openKafka(ctx context.Context, cfg Config, logger watermill.LoggerAdapter) (adapter, error) {
	brokers, err := kafkaBrokers(cfg.URL)
	if err != nil {
		return adapter{}, err
	}
	addr := strings.Join(brokers, ",")
	timeout := dialTimeout(ctx, cfg)

	admin, err := sarama.NewClusterAdmin(brokers, saramaConfig(cfg, timeout))
	if err != nil {
		return adapter{}, &ConnectError{Kind: Kafka, Addr: addr, Err: err}
	}
	pc := saramaConfig(cfg, timeout)
	pc.Producer.RequiredAcks = sarama.WaitForAll
	pc.Producer.Return.Successes = true
	pc.Producer.Retry.Max = 10
	pub, err := kafka.NewPublisher(kafka.PublisherConfig{
		Brokers:               brokers,
		Marshaler:             partitionMarshaler{},
		OverwriteSaramaConfig: pc,
	}, logger)
	if err != nil {
		_ = admin.Close()
		return adapter{}, &ConnectError{Kind: Kafka, Addr: addr, Err: err}
	}
	t := &kafkaTopics{admin: admin, detail: sarama.TopicDetail{NumPartitions: cfg.Partitions, ReplicationFactor: cfg.ReplicationFactor}}
	return adapter{
		pub:        pub,
		preparePub: t.ensure,
		newSub: func(group string) (groupSub, error) {
			sc := saramaConfig(cfg, cfg.DialTimeout)
			sc.Consumer.Return.Errors = true
			sc.Consumer.Offsets.Initial = sarama.OffsetOldest
			sc.Consumer.Offsets.AutoCommit.Enable = true
			sc.Consumer.Offsets.AutoCommit.Interval = time.Second
			sub, err := kafka.NewSubscriber(kafka.SubscriberConfig{
				Brokers:               brokers,
				Unmarshaler:           partitionMarshaler{},
				OverwriteSaramaConfig: sc,
				ConsumerGroup:         group,
				NackResendSleep:       kafkaNackResend,
				ReconnectRetrySleep:   time.Second,
			}, logger)
			if err != nil {
				return groupSub{}, &ConnectError{Kind: Kafka, Addr: addr, Err: err}
			}
			return groupSub{inner: sub, prepare: t.ensure}, nil
		},
		close: admin.Close,
	}, nil
}

// kafkaTopics creates the topics the broker uses when they do not exist.
type kafkaTopics struct {
	admin  sarama.ClusterAdmin
	detail sarama.TopicDetail
	mu     sync.Mutex
	known  map[string]bool
}

func (k *kafkaTopics) ensure(topic string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.known[topic] {
		return nil
	}
	detail := k.detail
	err := k.admin.CreateTopic(topic, &detail, false)
	if err != nil && !errors.Is(err, sarama.ErrTopicAlreadyExists) {
		return fmt.Errorf("creating kafka topic %s: %w", topic, err)
	}
	if k.known == nil {
		k.known = map[string]bool{}
	}
	k.known[topic] = true
	return nil
}

// partitionMarshaler is watermill-kafka's DefaultMarshaler (UUID in the
// "_watermill_message_uuid" header, each metadata entry a header, payload as
// the value) that also sets the record key to the PartitionKey metadata, so
// that one key's messages share a partition. Without it the key is nil and
// the producer picks a partition at random.
type partitionMarshaler struct{ kafka.DefaultMarshaler }

func (m partitionMarshaler) Marshal(topic string, msg *message.Message) (*sarama.ProducerMessage, error) {
	pm, err := m.DefaultMarshaler.Marshal(topic, msg)
	if err != nil {
		return nil, err
	}
	if key := msg.Metadata.Get(PartitionKey); key != "" {
		pm.Key = sarama.StringEncoder(key)
	}
	return pm, nil
}

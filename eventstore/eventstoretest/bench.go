package eventstoretest

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/stele-dev/stele/eventstore"
)

// BenchPayload is the 200-byte JSON document of the standard workloads.
var BenchPayload = []byte(`{"orderId":"ord-0000000001","customerId":"cust-000001","amount":37,"currency":"EUR","sku":"SKU-1","qty":2,"status":"placed","note":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}`)

// Bench runs the hot-path benchmarks against a backend: append (one event and
// a batch of ten, one writer and parallel writers), reading a page of the
// feed, and delivering events to a subscription. Throughput claims come from
// `stele bench`; these are for allocations and regressions.
func Bench(b *testing.B, backend func(b *testing.B) eventstore.Store) {
	meta := eventstore.Metadata{CorrelationID: "0123456789abcdef0123456789abcdef", Keys: map[string]string{"source": "bench"}}
	batch := func(n int) []eventstore.EventData {
		out := make([]eventstore.EventData, n)
		for i := range out {
			out[i] = eventstore.EventData{Type: "OrderPlaced", Data: BenchPayload, Metadata: meta}
		}
		return out
	}
	ctx := context.Background()
	// fill appends n events in batches of 100 and waits until the feed shows them.
	fill := func(b *testing.B, s eventstore.Store, prefix string, n int) {
		var last eventstore.Position
		for i := range n / 100 {
			res, err := s.Append(ctx, fmt.Sprintf("%s-%d", prefix, i), eventstore.Any, batch(100))
			if err != nil {
				b.Fatal(err)
			}
			last = res.LastPosition
		}
		if err := eventstore.WaitForPosition(ctx, s, last); err != nil {
			b.Fatal(err)
		}
	}
	for _, n := range []int{1, 10} {
		b.Run(fmt.Sprintf("Append/events=%d", n), func(b *testing.B) {
			s := backend(b)
			evs := batch(n)
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if _, err := s.Append(ctx, fmt.Sprintf("bench-%d", i%100), eventstore.Any, evs); err != nil {
					b.Fatal(err)
				}
				i++
			}
			b.ReportMetric(float64(b.N*n)/b.Elapsed().Seconds(), "events/s")
		})
	}
	b.Run("AppendParallel/events=1", func(b *testing.B) {
		s := backend(b)
		var next atomic.Int64
		b.ReportAllocs()
		b.SetParallelism(4) // 4 x GOMAXPROCS writers
		b.RunParallel(func(pb *testing.PB) {
			stream := fmt.Sprintf("par-%d", next.Add(1))
			evs := batch(1)
			for pb.Next() {
				if _, err := s.Append(ctx, stream, eventstore.Any, evs); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
	})
	b.Run("ReadAllPage/limit=500", func(b *testing.B) {
		s := backend(b)
		fill(b, s, "read", 1000)
		b.ReportAllocs()
		for b.Loop() {
			page, err := s.ReadAll(ctx, eventstore.ReadAllOpts{Limit: 500})
			if err != nil || len(page) != 500 {
				b.Fatalf("page of %d (%v)", len(page), err)
			}
		}
		b.ReportMetric(float64(b.N*500)/b.Elapsed().Seconds(), "events/s")
	})
	b.Run("SubscriptionDelivery", func(b *testing.B) {
		s := backend(b)
		const n = 1000
		fill(b, s, "sub", n)
		b.ReportAllocs()
		for b.Loop() {
			sctx, cancel := context.WithCancel(ctx)
			seen := 0
			_ = eventstore.Subscribe(sctx, s, eventstore.SubscribeOpts{}, func(context.Context, eventstore.Event) error {
				if seen++; seen == n {
					cancel()
				}
				return nil
			})
			cancel()
			if seen != n {
				b.Fatalf("delivered %d of %d", seen, n)
			}
		}
		b.ReportMetric(float64(b.N*n)/b.Elapsed().Seconds(), "events/s")
	})
}

package aggregate_test

import (
	"context"
	"errors"
	"fmt"

	"github.com/stele-dev/stele/aggregate"
	"github.com/stele-dev/stele/codec"
	"github.com/stele-dev/stele/eventstore/memstore"
)

// Cart is a tiny aggregate: Apply folds events, AddItem decides.
type Cart struct {
	aggregate.Root
	Items int
}

type ItemAdded struct{ SKU string }

var ErrCartFull = errors.New("cart is full")

func (c *Cart) Apply(e any) {
	if _, ok := e.(ItemAdded); ok {
		c.Items++
	}
}

func (c *Cart) AddItem(sku string) error {
	if c.Items == 2 {
		return ErrCartFull
	}
	aggregate.Record(c, ItemAdded{SKU: sku})
	return nil
}

// Update loads the aggregate, runs the command and saves what it recorded,
// retrying on a concurrency conflict.
func ExampleRepository_Update() {
	ctx := context.Background()
	reg := codec.NewRegistry(nil)
	codec.MustRegister[ItemAdded](reg, "cart.item_added", 1)
	repo, err := aggregate.NewRepository[Cart](memstore.New(nil), aggregate.Config{Category: "cart", Codec: reg})
	if err != nil {
		panic(err)
	}
	for _, sku := range []string{"tea", "cups", "pot"} {
		err := repo.Update(ctx, "42", func(c *Cart) error { return c.AddItem(sku) })
		fmt.Println(sku, "->", err)
	}
	cart, _ := repo.Load(ctx, "42")
	fmt.Println("items:", cart.Items, "version:", cart.Version())
	// Output:
	// tea -> <nil>
	// cups -> <nil>
	// pot -> cart is full
	// items: 2 version: 2
}

package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/stele-dev/stele/aggregate"
	"github.com/stele-dev/stele/codec"
	"github.com/stele-dev/stele/eventstore"
)

// The events of an account. They are plain structs; the names they are
// registered under in eventCodec are what the store keeps, forever.
type (
	AccountOpened struct {
		Owner          string
		OverdraftLimit int
	}
	Credited struct {
		Amount int
		Ref    string // what the money is for: a deposit or transfer id
	}
	Debited struct {
		Amount int
		Ref    string
	}
)

// eventCodec registers the account's events under stable names, at schema
// version 1.
func eventCodec() *codec.Registry {
	reg := codec.NewRegistry(nil)
	codec.MustRegister[AccountOpened](reg, "account.opened", 1)
	codec.MustRegister[Credited](reg, "account.credited", 1)
	codec.MustRegister[Debited](reg, "account.debited", 1)
	return reg
}

var (
	ErrInvalidAmount = errors.New("bank: amount must be positive")
	ErrOverdraft     = errors.New("bank: overdraft limit exceeded")
	ErrAlreadyOpen   = errors.New("bank: account already open")
	ErrNotOpen       = errors.New("bank: account not open")
	ErrSameAccount   = errors.New("bank: transfer to the same account")
)

// OverdraftError says by how much a debit was refused.
// errors.Is(err, ErrOverdraft) holds.
type OverdraftError struct {
	Account                string
	Balance, Amount, Limit int
}

func (e *OverdraftError) Error() string {
	return fmt.Sprintf("%v: %s has %d with an overdraft limit of %d, cannot take %d", ErrOverdraft, e.Account, e.Balance, e.Limit, e.Amount)
}

func (e *OverdraftError) Unwrap() error { return ErrOverdraft }

// Account is the aggregate. Its state is exported so that the default
// snapshot encoding (JSON of the exported fields) keeps all of it.
type Account struct {
	aggregate.Root
	Opened         bool
	Owner          string
	OverdraftLimit int
	Balance        int
}

// Apply folds one event into the state. It never fails: the rules were
// checked when the event was recorded.
func (a *Account) Apply(e any) {
	switch e := e.(type) {
	case AccountOpened:
		a.Opened = true
		a.Owner = e.Owner
		a.OverdraftLimit = e.OverdraftLimit
	case Credited:
		a.Balance += e.Amount
	case Debited:
		a.Balance -= e.Amount
	}
}

// Open opens the account for owner, who may go overdrawn down to
// -overdraftLimit.
func (a *Account) Open(owner string, overdraftLimit int) error {
	switch {
	case a.Opened:
		return ErrAlreadyOpen
	case owner == "":
		return errors.New("bank: an account needs an owner")
	case overdraftLimit < 0:
		return fmt.Errorf("%w: overdraft limit %d", ErrInvalidAmount, overdraftLimit)
	}
	aggregate.Record(a, AccountOpened{Owner: owner, OverdraftLimit: overdraftLimit})
	return nil
}

// Deposit credits amount. ref says what for.
func (a *Account) Deposit(amount int, ref string) error {
	switch {
	case !a.Opened:
		return ErrNotOpen
	case amount <= 0:
		return fmt.Errorf("%w: %d", ErrInvalidAmount, amount)
	}
	aggregate.Record(a, Credited{Amount: amount, Ref: ref})
	return nil
}

// Withdraw debits amount unless that takes the balance below
// -OverdraftLimit.
func (a *Account) Withdraw(amount int, ref string) error {
	switch {
	case !a.Opened:
		return ErrNotOpen
	case amount <= 0:
		return fmt.Errorf("%w: %d", ErrInvalidAmount, amount)
	case a.Balance-amount < -a.OverdraftLimit:
		return &OverdraftError{Account: a.ID(), Balance: a.Balance, Amount: amount, Limit: a.OverdraftLimit}
	}
	aggregate.Record(a, Debited{Amount: amount, Ref: ref})
	return nil
}

// Bank runs the commands on accounts kept in an event store.
type Bank struct {
	accounts *aggregate.Repository[Account, *Account]
}

// SnapshotEvery: a load folds at most this many events after the snapshot.
const SnapshotEvery = 50

// NewBank returns a Bank over store. snaps may be nil: no snapshots.
func NewBank(store eventstore.Store, snaps aggregate.SnapshotStore) (*Bank, error) {
	cfg := aggregate.Config{
		Category: "account",
		Codec:    eventCodec(),
		// A transfer's credit comes after its debit is stored, so it should
		// not give up on a busy account quickly.
		MaxRetries: 50,
	}
	if snaps != nil {
		cfg.Snapshots = snaps
		cfg.SnapshotEvery = SnapshotEvery
	}
	repo, err := aggregate.NewRepository[Account](store, cfg)
	if err != nil {
		return nil, err
	}
	return &Bank{accounts: repo}, nil
}

// Open opens account id with an opening deposit, in one save.
func (b *Bank) Open(ctx context.Context, id, owner string, overdraftLimit, deposit int) error {
	err := b.accounts.Update(ctx, id, func(a *Account) error {
		if err := a.Open(owner, overdraftLimit); err != nil {
			return err
		}
		if deposit == 0 {
			return nil
		}
		return a.Deposit(deposit, "opening-"+id)
	})
	if err != nil {
		return fmt.Errorf("opening %s: %w", id, err)
	}
	return nil
}

// Deposit credits amount to account id.
func (b *Bank) Deposit(ctx context.Context, id string, amount int, ref string) error {
	if err := b.accounts.Update(ctx, id, func(a *Account) error { return a.Deposit(amount, ref) }); err != nil {
		return fmt.Errorf("depositing %d to %s: %w", amount, id, err)
	}
	return nil
}

// Withdraw debits amount from account id.
func (b *Bank) Withdraw(ctx context.Context, id string, amount int, ref string) error {
	if err := b.accounts.Update(ctx, id, func(a *Account) error { return a.Withdraw(amount, ref) }); err != nil {
		return fmt.Errorf("withdrawing %d from %s: %w", amount, id, err)
	}
	return nil
}

// Account loads account id (aggregate.ErrNotFound if it was never opened).
func (b *Bank) Account(ctx context.Context, id string) (*Account, error) {
	return b.accounts.Load(ctx, id)
}

// Transfer moves amount from one account to another. transferID is the Ref
// of both events and the correlation id in their metadata.
//
// Two aggregates cannot change in one save, so this is two steps: debit the
// source, then credit the target, each with Update (which reloads and
// retries on a concurrency conflict). A real system runs this as a saga
// that records the transfer, retries the credit until it lands and, if it
// cannot, compensates by crediting the source back (sagas are a later stele
// issue). Here a credit cannot fail by rule: the amount was checked by the
// debit, the target is checked to be open before anything is written, and
// accounts are never closed. Only an infrastructure failure can stop it
// between the two steps, and the error then says so.
func (b *Bank) Transfer(ctx context.Context, transferID, from, to string, amount int) error {
	fail := func(err error) error { return fmt.Errorf("transfer %s: %w", transferID, err) }
	if from == to {
		return fail(ErrSameAccount)
	}
	if _, err := b.accounts.Load(ctx, to); err != nil {
		return fail(fmt.Errorf("target %s: %w", to, err))
	}
	ctx = aggregate.WithMetadata(ctx, eventstore.Metadata{CorrelationID: transferID})
	if err := b.accounts.Update(ctx, from, func(a *Account) error { return a.Withdraw(amount, transferID) }); err != nil {
		return fail(fmt.Errorf("debiting %s: %w", from, err))
	}
	// The debit is stored: a caller giving up now must not strand the money.
	credit := context.WithoutCancel(ctx)
	if err := b.accounts.Update(credit, to, func(a *Account) error { return a.Deposit(amount, transferID) }); err != nil {
		return fail(fmt.Errorf("%s is debited but crediting %s failed: %w", from, to, err))
	}
	return nil
}

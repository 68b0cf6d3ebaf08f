package outbox

// SetHooks lets fault tests stop a relay where a crash or a pause would:
// beforeCommit runs after a batch was published and before its checkpoint
// (an error ends Run like a crash, keeping the lease until it runs out), and
// beforePublish runs before each Publish call.
func SetHooks(r *Relay, beforeCommit func() error, beforePublish func()) {
	r.beforeCommit, r.beforePublish = beforeCommit, beforePublish
}

// ErrCrash is what Run returns after beforeCommit failed.
var ErrCrash = errCrash

package broker

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net/url"
	"strings"

	"github.com/stele-dev/stele/eventstore/pgstore"
)

// ErrInsecureBroker is matched (errors.Is) by every refusal of RequireTLS.
var ErrInsecureBroker = errors.New("broker: the connection does not use verified TLS with credentials")

// TLSError is RequireTLS's refusal: the Config field at fault and why. It
// never holds a password.
type TLSError struct {
	Kind   Kind
	Field  string // "URL", "TLS", "TLS.InsecureSkipVerify", "DB", ...
	Reason string
}

func (e *TLSError) Error() string {
	return "broker: production mode refuses " + string(e.Kind) + " " + e.Field + ": " + e.Reason
}

// Unwrap makes errors.Is(err, ErrInsecureBroker) hold.
func (e *TLSError) Unwrap() error { return ErrInsecureBroker }

// RequireTLS accepts cfg only if Open would talk to the broker over TLS that
// verifies the server's certificate and host name, and authenticate:
//
//   - GoChannel: always (in process, no network).
//   - Postgres: URL must pass pgstore.RequireTLS (sslmode=verify-full,
//     sslrootcert, network hosts). A DB handle cannot be checked here:
//     refused; open it with pgstore.OpenTLS and check its DSN there.
//   - RabbitMQ: an amqps:// URL with a user other than "guest" and a
//     password.
//   - Redis: a rediss:// URL, or TLS set; a password in the URL; no
//     skip_verify query parameter.
//   - NATS: TLS set; credentials in the URL (user:password or a token) or
//     a client certificate in TLS.
//   - Kafka: TLS set with a client certificate (Config has no SASL; the
//     certificate is the credential).
//
// Whenever TLS is set it must not skip verification and must not allow
// versions below TLS 1.2. A refusal is a *TLSError; a Config Open would
// refuse anyway is a *ConfigError.
func RequireTLS(cfg Config) error {
	cfg, err := normalize(cfg)
	if err != nil {
		return err
	}
	refuse := func(field, format string, args ...any) error {
		return &TLSError{Kind: cfg.Kind, Field: field, Reason: fmt.Sprintf(format, args...)}
	}
	if cfg.TLS != nil {
		if cfg.TLS.InsecureSkipVerify {
			return refuse("TLS.InsecureSkipVerify", "verifies no certificate: anyone in the path can pose as the broker")
		}
		if cfg.TLS.MinVersion != 0 && cfg.TLS.MinVersion < tls.VersionTLS12 {
			return refuse("TLS.MinVersion", "allows TLS versions below 1.2")
		}
	}
	hasClientCert := cfg.TLS != nil && (len(cfg.TLS.Certificates) > 0 || cfg.TLS.GetClientCertificate != nil)
	var u *url.URL
	if cfg.URL != "" && cfg.Kind != Kafka && cfg.Kind != Postgres {
		if u, err = url.Parse(cfg.URL); err != nil {
			return refuse("URL", "does not parse")
		}
	}
	password := func() string {
		if u == nil || u.User == nil {
			return ""
		}
		p, _ := u.User.Password()
		return p
	}
	switch cfg.Kind {
	case GoChannel:
		return nil
	case Postgres:
		if cfg.DB != nil {
			return refuse("DB", "a handle's connection string cannot be checked here; open it with pgstore.OpenTLS, or pass the DSN as URL")
		}
		if err := pgstore.RequireTLS(cfg.URL); err != nil {
			return refuse("URL", "%v", err)
		}
	case RabbitMQ:
		if !strings.EqualFold(u.Scheme, "amqps") {
			return refuse("URL", "amqp:// sends credentials and messages in plaintext; use amqps://")
		}
		if u.User == nil || u.User.Username() == "" || password() == "" {
			return refuse("URL", "no user and password: give the service its own credentials")
		}
		if u.User.Username() == "guest" {
			return refuse("URL", `user "guest" is RabbitMQ's default account; give the service its own`)
		}
	case Redis:
		if !strings.EqualFold(u.Scheme, "rediss") && cfg.TLS == nil {
			return refuse("URL", "redis:// without TLS sends the password and messages in plaintext; use rediss:// or set TLS")
		}
		if u.Query().Has("skip_verify") {
			return refuse("URL", "skip_verify turns certificate verification off")
		}
		if password() == "" {
			return refuse("URL", "no password: configure an ACL user (rediss://user:password@host)")
		}
	case NATS:
		if cfg.TLS == nil {
			return refuse("TLS", "not set: nats:// is plaintext unless TLS is given")
		}
		if (u.User == nil || u.User.Username() == "") && !hasClientCert {
			return refuse("URL", "no credentials: put user:password or a token in the URL, or a client certificate in TLS")
		}
	case Kafka:
		if cfg.TLS == nil {
			return refuse("TLS", "not set: Kafka would be spoken in plaintext")
		}
		if !hasClientCert {
			return refuse("TLS.Certificates", "no client certificate: the only credential Config can carry for Kafka")
		}
	}
	return nil
}

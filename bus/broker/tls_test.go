package broker_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/bus/broker"
)

// TestRequireTLS: production mode accepts each broker kind only with
// verified TLS and credentials, and names the field it refuses.
func TestRequireTLS(t *testing.T) {
	ca := filepath.Join(t.TempDir(), "ca.pem") // a CA file for pgstore.RequireTLS
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	verified := &tls.Config{MinVersion: tls.VersionTLS12}
	withCert := &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{{1}}}}}
	insecure := &tls.Config{InsecureSkipVerify: true, Certificates: withCert.Certificates}
	old := &tls.Config{MinVersion: tls.VersionTLS10, Certificates: withCert.Certificates}
	for _, c := range []struct {
		cfg   broker.Config
		field string // "" accepted
	}{
		{broker.Config{Kind: broker.GoChannel}, ""},
		{broker.Config{URL: "amqps://svc:pw@rabbit.example:5671/"}, ""},
		{broker.Config{URL: "amqps://svc:pw@rabbit.example:5671/", TLS: verified}, ""},
		{broker.Config{URL: "amqp://svc:pw@rabbit.example:5672/"}, "URL"},
		{broker.Config{URL: "amqps://guest:guest@rabbit.example:5671/"}, "URL"},
		{broker.Config{URL: "amqps://rabbit.example:5671/"}, "URL"},
		{broker.Config{URL: "amqps://svc:pw@rabbit.example:5671/", TLS: insecure}, "TLS.InsecureSkipVerify"},
		{broker.Config{URL: "rediss://svc:pw@redis.example:6380/0"}, ""},
		{broker.Config{URL: "redis://svc:pw@redis.example:6380/0", TLS: verified}, ""},
		{broker.Config{URL: "redis://svc:pw@redis.example:6379/0"}, "URL"},
		{broker.Config{URL: "rediss://svc:pw@redis.example:6380/0?skip_verify=true"}, "URL"},
		{broker.Config{URL: "rediss://redis.example:6380/0"}, "URL"},
		{broker.Config{URL: "nats://svc:pw@nats.example:4222", TLS: verified}, ""},
		{broker.Config{URL: "nats://nats.example:4222", TLS: withCert}, ""},
		{broker.Config{URL: "nats://svc:pw@nats.example:4222"}, "TLS"},
		{broker.Config{URL: "nats://nats.example:4222", TLS: verified}, "URL"},
		{broker.Config{URL: "nats://nats.example:4222", TLS: old}, "TLS.MinVersion"},
		{broker.Config{URL: "kafka://k1:9093,k2:9093", TLS: withCert}, ""},
		{broker.Config{URL: "kafka://k1:9093", TLS: verified}, "TLS.Certificates"},
		{broker.Config{URL: "kafka://k1:9092"}, "TLS"},
		{broker.Config{URL: "postgres://svc:pw@db.example:5432/app?sslmode=verify-full&sslrootcert=" + ca}, ""},
		{broker.Config{URL: "postgres://svc:pw@db.example:5432/app?sslmode=require"}, "URL"},
		{broker.Config{DB: &sqlx.DB{}}, "DB"},
	} {
		err := broker.RequireTLS(c.cfg)
		if c.field == "" {
			if err != nil {
				t.Errorf("%s: refused: %v", c.cfg.URL, err)
			}
			continue
		}
		var te *broker.TLSError
		if !errors.As(err, &te) || !errors.Is(err, broker.ErrInsecureBroker) || te.Field != c.field {
			t.Errorf("%s: %v, want a refusal of %s", c.cfg.URL, err, c.field)
		}
		if err != nil && strings.Contains(err.Error(), ":pw@") {
			t.Errorf("the error shows the password: %v", err)
		}
	}
	// A Config Open would refuse is a *ConfigError, as from Open.
	var ce *broker.ConfigError
	if err := broker.RequireTLS(broker.Config{URL: "ftp://x"}); !errors.As(err, &ce) {
		t.Fatalf("an unknown scheme: %v", err)
	}
}

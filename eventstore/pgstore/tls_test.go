package pgstore_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/stele-dev/stele/eventstore/pgstore"
	"github.com/stele-dev/stele/internal/testdb"
)

// testCA is a certificate authority made for one test.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	file string // the CA certificate, PEM
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "stele test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	file := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(file, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, key: key, file: file}
}

// serverCert issues a server certificate for the given DNS names and IPs.
func (ca *testCA) serverCert(t *testing.T, names []string, ips []net.IP) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "server"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		DNSNames: names, IPAddresses: ips,
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestRequireTLSConnectionStrings: production mode accepts verify-full with
// a CA and explicit network hosts, in URL and keyword=value form, and
// refuses everything weaker with a *TLSError naming the setting, never
// showing the password.
func TestRequireTLSConnectionStrings(t *testing.T) {
	ca := newTestCA(t)
	notPEM := filepath.Join(t.TempDir(), "not.pem")
	if err := os.WriteFile(notPEM, []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(t.TempDir(), "missing.pem")
	quoted := "'" + strings.ReplaceAll(ca.file, `'`, `\'`) + "'"

	for _, dsn := range []string{
		"postgres://app:s3cret@db.example.com:5432/app?sslmode=verify-full&sslrootcert=" + ca.file,
		"postgresql://app@db.example.com/app?sslrootcert=" + ca.file + "&sslmode=verify-full&application_name=x",
		"postgres://app@10.0.0.5,db2.example.com:5433/app?sslmode=verify-full&sslrootcert=" + ca.file,
		"postgres://app@[2001:db8::1]:5432/app?sslmode=verify-full&sslrootcert=" + ca.file,
		"postgres://app@db.example.com/app?sslmode=verify-full&sslrootcert=system",
		"host=db.example.com port=5432 user=app password='p w\\'x' dbname=app sslmode=verify-full sslrootcert=" + quoted,
		"  host = db.example.com sslmode = verify-full   sslrootcert=" + ca.file + " ",
		"host=db1.example.com,db2.example.com sslmode=verify-full sslrootcert=" + ca.file,
	} {
		if err := pgstore.RequireTLS(dsn); err != nil {
			t.Errorf("refused %q: %v", dsn, err)
		}
	}

	for _, c := range []struct {
		dsn     string
		setting string
	}{
		{"postgres://app:s3cret@db.example.com/app", "sslmode"},
		{"postgres://app:s3cret@db.example.com/app?sslmode=disable&sslrootcert=" + ca.file, "sslmode"},
		{"postgres://app:s3cret@db.example.com/app?sslmode=allow&sslrootcert=" + ca.file, "sslmode"},
		{"postgres://app:s3cret@db.example.com/app?sslmode=prefer&sslrootcert=" + ca.file, "sslmode"},
		{"postgres://app:s3cret@db.example.com/app?sslmode=require&sslrootcert=" + ca.file, "sslmode"},
		{"postgres://app:s3cret@db.example.com/app?sslmode=verify-ca&sslrootcert=" + ca.file, "sslmode"},
		{"postgres://app:s3cret@db.example.com/app?sslmode=VERIFY-FULL&sslrootcert=" + ca.file, "sslmode"},
		{"postgres://app:s3cret@db.example.com/app?sslmode=pqgo-custom&sslrootcert=" + ca.file, "sslmode"},
		{"host=db.example.com password=s3cret sslmode=require", "sslmode"},
		{"host=db.example.com password=s3cret sslrootcert=" + ca.file, "sslmode"},
		{"postgres://app:s3cret@db.example.com/app?sslmode=verify-full", "sslrootcert"},
		{"postgres://app:s3cret@db.example.com/app?sslmode=verify-full&sslrootcert=", "sslrootcert"},
		{"postgres://app:s3cret@db.example.com/app?sslmode=verify-full&sslrootcert=" + missing, "sslrootcert"},
		{"postgres://app:s3cret@db.example.com/app?sslmode=verify-full&sslrootcert=" + notPEM, "sslrootcert"},
		{"host=db.example.com password=s3cret sslmode=verify-full", "sslrootcert"},
		{"postgres://app:s3cret@/app?sslmode=verify-full&sslrootcert=" + ca.file, "host"},
		{"postgres://app:s3cret@%2Fvar%2Frun%2Fpostgresql/app?sslmode=verify-full&sslrootcert=" + ca.file, "host"},
		{"postgres:///app?host=/var/run/postgresql&sslmode=verify-full&sslrootcert=" + ca.file, "host"},
		{"postgres://app:s3cret@db.example.com,%2Ftmp/app?sslmode=verify-full&sslrootcert=" + ca.file, "host"},
		{"password=s3cret sslmode=verify-full sslrootcert=" + ca.file, "host"},
		{"host=/tmp password=s3cret sslmode=verify-full sslrootcert=" + ca.file, "host"},
		{"host=@abstract password=s3cret sslmode=verify-full sslrootcert=" + ca.file, "host"},
		{"host=db.example.com,/tmp password=s3cret sslmode=verify-full sslrootcert=" + ca.file, "host"},
		{"host=db.example.com,, password=s3cret sslmode=verify-full sslrootcert=" + ca.file, "host"},
		// Given twice: lib/pq and pgx might not agree which one counts.
		{"host=db.example.com password=s3cret sslmode=verify-full sslrootcert=" + ca.file + " sslmode=disable", "sslmode"},
		{"postgres://app:s3cret@db.example.com/app?sslmode=verify-full&sslrootcert=" + ca.file + "&sslmode=require", "sslmode"},
		{"postgres://app:s3cret@db.example.com/app?host=evil.example.com&sslmode=verify-full&sslrootcert=" + ca.file, "host"},
		// Ambiguous or single-driver keys.
		{"postgres://app:s3cret@db.example.com/app?ssl=true&sslmode=verify-full&sslrootcert=" + ca.file, "ssl"},
		{"host=db.example.com password=s3cret requiressl=1 sslmode=verify-full sslrootcert=" + ca.file, "requiressl"},
		{"host=db.example.com password=s3cret sslinline=true sslmode=verify-full sslrootcert=" + ca.file, "sslinline"},
		// Not a connection string.
		{"host=db.example.com password='s3cret sslmode=verify-full", "dsn"},
		{"host db.example.com password=s3cret", "dsn"},
		{"postgres://app:s3cret@db.example.com/app?sslmode=verify-full&sslrootcert=%zz", "dsn"},
	} {
		err := pgstore.RequireTLS(c.dsn)
		var te *pgstore.TLSError
		if !errors.As(err, &te) || !errors.Is(err, pgstore.ErrInsecureDSN) {
			t.Errorf("%q: %v, want a *TLSError", c.dsn, err)
			continue
		}
		if te.Setting != c.setting {
			t.Errorf("%q: refused for %s (%v), want %s", c.dsn, te.Setting, err, c.setting)
		}
		if strings.Contains(err.Error(), "s3cret") {
			t.Errorf("%q: the error shows the password: %v", c.dsn, err)
		}
	}
}

// fakePG answers like a PostgreSQL server up to the TLS handshake and
// records what the client did: sent its startup message in plaintext, failed
// the handshake, or sent its startup message over TLS.
type fakePG struct {
	ln    net.Listener
	cert  *tls.Certificate // nil: the server says it has no TLS
	wg    sync.WaitGroup
	mu    sync.Mutex
	seen  []string
	conns []net.Conn
}

func startFakePG(t *testing.T, cert *tls.Certificate) *fakePG {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakePG{ln: ln, cert: cert}
	f.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f.mu.Lock()
			f.conns = append(f.conns, c)
			f.mu.Unlock()
			f.wg.Go(func() { f.handle(c) })
		}
	})
	t.Cleanup(f.stop)
	return f
}

// stop closes the listener and every connection (lib/pq leaves the first
// connection of an sslmode=prefer fallback open) and waits for the handlers.
func (f *fakePG) stop() {
	f.ln.Close()
	f.mu.Lock()
	for _, c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}

func (f *fakePG) port() string { _, p, _ := net.SplitHostPort(f.ln.Addr().String()); return p }

func (f *fakePG) record(s string) {
	f.mu.Lock()
	f.seen = append(f.seen, s)
	f.mu.Unlock()
}

func (f *fakePG) events() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.seen)
}

// fatal is an ErrorResponse the drivers show as the server's error.
func fatal(w io.Writer) {
	fields := "SFATAL\x00VFATAL\x00C28000\x00Mfake server refuses the login\x00\x00"
	msg := []byte{'E', 0, 0, 0, 0}
	binary.BigEndian.PutUint32(msg[1:], uint32(4+len(fields)))
	_, _ = w.Write(append(msg, fields...))
}

func (f *fakePG) handle(c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	for {
		var hdr [8]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		n := binary.BigEndian.Uint32(hdr[:4])
		switch code := binary.BigEndian.Uint32(hdr[4:]); {
		case n == 8 && code == 80877104: // GSSENCRequest
			_, _ = c.Write([]byte{'N'})
		case n == 8 && code == 80877103: // SSLRequest
			if f.cert == nil {
				_, _ = c.Write([]byte{'N'})
				continue
			}
			_, _ = c.Write([]byte{'S'})
			tc := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{*f.cert}})
			if err := tc.Handshake(); err != nil {
				f.record("handshake failed")
				return
			}
			var l [4]byte
			if _, err := io.ReadFull(tc, l[:]); err != nil {
				f.record("no startup after the handshake")
				return
			}
			_, _ = io.CopyN(io.Discard, tc, int64(binary.BigEndian.Uint32(l[:]))-4)
			f.record("startup over TLS")
			fatal(tc)
			return
		default: // a startup message, in plaintext
			f.record("startup in plaintext")
			if n > 8 && n < 1<<16 {
				_, _ = io.CopyN(io.Discard, c, int64(n-8))
			}
			fatal(c)
			return
		}
	}
}

// ping connects once through driver and returns the error.
func ping(t *testing.T, driver, dsn string) error {
	t.Helper()
	db, err := sqlx.Open(driver, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return db.PingContext(ctx)
}

// TestTLSVerifyFullOnTheWire: a connection string RequireTLS accepts never
// sends its startup message (user name, database) in plaintext, fails
// against a server that offers no TLS, that shows a certificate for another
// host, or one from another CA, and succeeds to the TLS handshake against the
// right certificate. The control, sslmode=prefer, does fall back to
// plaintext: what production mode refuses. Both drivers.
func TestTLSVerifyFullOnTheWire(t *testing.T) {
	ca, otherCA := newTestCA(t), newTestCA(t)
	local := []net.IP{net.ParseIP("127.0.0.1")}
	right := ca.serverCert(t, nil, local)
	wrongHost := ca.serverCert(t, []string{"db.example.test"}, nil)
	wrongCA := otherCA.serverCert(t, nil, local)

	for _, driver := range testdb.Drivers {
		t.Run(driver, func(t *testing.T) {
			for _, c := range []struct {
				name    string
				cert    *tls.Certificate
				mode    string
				want    []string // what the server saw, in order
				errPart string
			}{
				{"no TLS on the server", nil, "verify-full", nil, ""},
				{"certificate for another host", &wrongHost, "verify-full", []string{"handshake failed"}, "certificate"},
				{"certificate of another CA", &wrongCA, "verify-full", []string{"handshake failed"}, "certificate"},
				{"the right certificate", &right, "verify-full", []string{"startup over TLS"}, "fake server refuses the login"},
				{"control: prefer falls back", nil, "prefer", []string{"startup in plaintext"}, "fake server refuses the login"},
			} {
				t.Run(c.name, func(t *testing.T) {
					srv := startFakePG(t, c.cert)
					dsn := "postgres://app@127.0.0.1:" + srv.port() + "/app?connect_timeout=5&sslmode=" + c.mode + "&sslrootcert=" + ca.file
					accepted := pgstore.RequireTLS(dsn) == nil
					if accepted != (c.mode == "verify-full") {
						t.Fatalf("RequireTLS accepted=%v for sslmode=%s", accepted, c.mode)
					}
					err := ping(t, driver, dsn)
					if err == nil {
						t.Fatal("connected to the fake server")
					}
					if c.errPart != "" && !strings.Contains(err.Error(), c.errPart) {
						t.Errorf("error %q, want it to mention %q", err, c.errPart)
					}
					srv.stop()
					got := srv.events()
					if accepted && slices.Contains(got, "startup in plaintext") {
						t.Fatalf("a verify-full connection sent its startup in plaintext: %v", got)
					}
					// database/sql may try a second time; every attempt must match.
					for i := 0; i < len(got); i += len(c.want) {
						if len(c.want) == 0 || !slices.Equal(got[i:min(i+len(c.want), len(got))], c.want) {
							t.Fatalf("the server saw %v, want %v (per attempt)", got, c.want)
						}
					}
					if len(c.want) > 0 && len(got) == 0 {
						t.Fatalf("the server saw nothing, want %v", c.want)
					}
				})
			}
		})
	}
}

// TestTLSOpen: OpenTLS refuses a weak connection string before dialling and
// connects with verification otherwise.
func TestTLSOpen(t *testing.T) {
	ca := newTestCA(t)
	right := ca.serverCert(t, nil, []net.IP{net.ParseIP("127.0.0.1")})
	srv := startFakePG(t, &right)
	base := "postgres://app@127.0.0.1:" + srv.port() + "/app?connect_timeout=5&sslrootcert=" + ca.file
	ctx := context.Background()
	if _, err := pgstore.OpenTLS(ctx, "postgres", base+"&sslmode=require"); !errors.Is(err, pgstore.ErrInsecureDSN) {
		t.Fatalf("OpenTLS with sslmode=require: %v", err)
	}
	if got := srv.events(); len(got) != 0 {
		t.Fatalf("a refused connection string dialled the server: %v", got)
	}
	for _, driver := range testdb.Drivers {
		_, err := pgstore.OpenTLS(ctx, driver, base+"&sslmode=verify-full")
		if err == nil || !strings.Contains(err.Error(), "fake server refuses the login") {
			t.Fatalf("%s: OpenTLS: %v", driver, err)
		}
	}
	srv.stop()
	if got := srv.events(); len(got) < 2 || slices.ContainsFunc(got, func(s string) bool { return s != "startup over TLS" }) {
		t.Fatalf("the server saw %v", got)
	}
}

// FuzzRequireTLS: any string is either refused with a *TLSError or is one
// both drivers parse into verified TLS for every host (crossCheck); never a
// panic.
func FuzzRequireTLS(f *testing.F) {
	for _, s := range []string{
		"postgres://u:p@h/db?sslmode=verify-full&sslrootcert=system",
		"host=h sslmode=verify-full sslrootcert=system",
		"host='h' sslmode='verify-full' sslrootcert='system' password='a\\'b'",
		"postgres://u@[::1]:5432,h2/db?sslmode=verify-full&sslrootcert=system",
		"postgresql://%2Ftmp/db?sslmode=verify-full",
		"host=h,,x sslmode=verify-full",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, dsn string) {
		err := pgstore.RequireTLS(dsn)
		var te *pgstore.TLSError
		if err != nil && !errors.As(err, &te) {
			t.Fatalf("%q: %v is not a *TLSError", dsn, err)
		}
		if err == nil && !strings.Contains(dsn, "verify-full") {
			t.Fatalf("accepted %q", dsn)
		}
	})
}

package pgstore

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
)

// ErrInsecureDSN is matched (errors.Is) by every refusal of RequireTLS.
var ErrInsecureDSN = errors.New("pgstore: the connection string does not require verified TLS")

// TLSError is RequireTLS's refusal: the setting of the connection string
// that is missing or too weak, and why. It never holds a password.
type TLSError struct {
	Setting string // "sslmode", "sslrootcert", "host", another key, or "dsn" for the string as a whole
	Value   string // the value found; "" when the setting is missing
	Reason  string
}

func (e *TLSError) Error() string {
	s := e.Setting
	if e.Value != "" {
		s += "=" + e.Value
	}
	return "pgstore: production mode refuses " + s + ": " + e.Reason
}

// Unwrap makes errors.Is(err, ErrInsecureDSN) hold.
func (e *TLSError) Unwrap() error { return ErrInsecureDSN }

// RequireTLS accepts a PostgreSQL connection string (URL or keyword=value
// form) only if both drivers stele supports, lib/pq and pgx, would connect
// with TLS and verify the server's certificate and host name, with no
// fallback to plaintext. That is, it must state
//
//   - sslmode=verify-full (disable, allow, prefer and require verify
//     nothing; verify-ca does not check the host name; a missing sslmode
//     means prefer, which falls back to plaintext);
//   - sslrootcert: a readable file of PEM certificates of the CA that signs
//     the server's certificate, or "system" to trust the system's roots
//     (every public CA); without it the drivers disagree on what to trust;
//   - host: one or more host names or addresses, none a Unix socket (no TLS
//     there) and none left to $PGHOST or the driver's default.
//
// Each of them given once (a duplicate key is refused: drivers disagree on
// which one counts); the "ssl", "requiressl" and "sslinline" keys are
// refused as ambiguous or single-driver. Settings from the environment
// (PGSSLMODE, PGHOST, ...) do not count: the string itself must be safe.
// A refusal is a *TLSError naming the setting.
func RequireTLS(dsn string) error {
	keys, password, err := parseDSN(dsn)
	if err != nil {
		return &TLSError{Setting: "dsn", Reason: redactPassword(err.Error(), password)}
	}
	for k, vs := range keys {
		if len(vs) > 1 {
			return &TLSError{Setting: k, Reason: fmt.Sprintf("given %d times; drivers disagree about which one counts", len(vs))}
		}
	}
	for _, k := range []string{"ssl", "requiressl", "sslinline"} {
		if vs, ok := keys[k]; ok {
			return &TLSError{Setting: k, Value: vs[0], Reason: "ambiguous or understood by one driver only; state sslmode=verify-full and sslrootcert alone"}
		}
	}
	mode, ok := keys["sslmode"]
	if !ok {
		return &TLSError{Setting: "sslmode", Reason: "not set: the drivers then use prefer, which verifies nothing and falls back to plaintext; want sslmode=verify-full"}
	}
	if mode[0] != "verify-full" {
		why := map[string]string{
			"disable":   "no TLS at all",
			"allow":     "plaintext first, TLS only if the server insists",
			"prefer":    "falls back to plaintext, and verifies no certificate",
			"require":   "encrypts but verifies no certificate: anyone in the path can pose as the server",
			"verify-ca": "checks the certificate's CA but not the host name: any certificate of that CA passes",
		}[mode[0]]
		if why == "" {
			why = "not a mode both drivers know as verifying"
		}
		return &TLSError{Setting: "sslmode", Value: mode[0], Reason: why + "; want sslmode=verify-full"}
	}
	root, ok := keys["sslrootcert"]
	if !ok || root[0] == "" {
		return &TLSError{Setting: "sslrootcert", Reason: `not set: name the CA that signs the server certificate (a PEM file, or "system" for the system's roots)`}
	}
	if root[0] != "system" {
		if err := checkCAFile(root[0]); err != nil {
			return &TLSError{Setting: "sslrootcert", Value: root[0], Reason: err.Error()}
		}
	}
	hosts, ok := keys["host"]
	if !ok {
		return &TLSError{Setting: "host", Reason: "not set: the drivers then take $PGHOST or a default, possibly a Unix socket, which has no TLS"}
	}
	for h := range strings.SplitSeq(hosts[0], ",") {
		h = strings.TrimSpace(h)
		switch {
		case h == "":
			return &TLSError{Setting: "host", Value: hosts[0], Reason: "an empty host: the driver's default (possibly a Unix socket) would be used"}
		case isSocket(h):
			return &TLSError{Setting: "host", Value: h, Reason: "a Unix socket: PostgreSQL does not use TLS on it"}
		}
	}
	return crossCheck(dsn, password)
}

// OpenTLS opens and pings a database after RequireTLS accepted dsn: the
// constructor for production. driver is "postgres" (lib/pq) or "pgx".
func OpenTLS(ctx context.Context, driver, dsn string) (*sqlx.DB, error) {
	if err := RequireTLS(dsn); err != nil {
		return nil, err
	}
	db, err := sqlx.Open(driver, dsn)
	if err != nil {
		return nil, err
	}
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("pgstore: connecting with verify-full TLS: %w", err)
	}
	return db, nil
}

// crossCheck parses dsn as each driver does (with what it reads from the
// environment and files) and checks that every host it would try gets TLS
// with certificate and host name verification: a guard against any
// difference between our reading of the string and theirs.
func crossCheck(dsn, password string) error {
	refuse := func(format string, args ...any) error {
		return &TLSError{Setting: "dsn", Reason: redactPassword(fmt.Sprintf(format, args...), password)}
	}
	pc, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return refuse("pgx cannot use it: %v", err)
	}
	check := func(host string, tlsOK bool, verified bool) error {
		if !tlsOK {
			return refuse("pgx would connect to %s without TLS", host)
		}
		if !verified {
			return refuse("pgx would not verify the certificate of %s", host)
		}
		return nil
	}
	if err := check(pc.Host, pc.TLSConfig != nil, pc.TLSConfig != nil && !pc.TLSConfig.InsecureSkipVerify && pc.TLSConfig.RootCAs != nil && pc.TLSConfig.ServerName != ""); err != nil {
		return err
	}
	for _, fb := range pc.Fallbacks {
		if err := check(fb.Host, fb.TLSConfig != nil, fb.TLSConfig != nil && !fb.TLSConfig.InsecureSkipVerify && fb.TLSConfig.RootCAs != nil && fb.TLSConfig.ServerName != ""); err != nil {
			return err
		}
	}
	qc, err := pq.NewConfig(dsn)
	if err != nil {
		return refuse("lib/pq cannot use it: %v", err)
	}
	if qc.SSLMode != pq.SSLModeVerifyFull {
		return refuse("lib/pq would use sslmode %q", qc.SSLMode)
	}
	hosts := []string{qc.Host}
	if qc.Hostaddr.IsValid() {
		hosts = nil
	}
	for _, m := range qc.Multi {
		if !m.Hostaddr.IsValid() {
			hosts = append(hosts, m.Host)
		}
	}
	for _, h := range hosts {
		if isSocket(h) {
			return refuse("lib/pq would connect to the Unix socket %s, without TLS", h)
		}
	}
	return nil
}

// isSocket reports whether a host names a Unix-domain socket, as the
// drivers decide it: an absolute path, or '@' for the abstract namespace.
func isSocket(h string) bool {
	return strings.HasPrefix(h, "/") || strings.HasPrefix(h, "@") || filepath.IsAbs(h) ||
		(len(h) >= 3 && h[1] == ':' && (h[2] == '\\' || h[2] == '/')) // C:\ on Windows
}

func checkCAFile(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("cannot read the CA file: %w", err)
	}
	pool := x509.NewCertPool()
	found := false
	for rest := data; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type == "CERTIFICATE" {
			if c, err := x509.ParseCertificate(block.Bytes); err == nil {
				pool.AddCert(c)
				found = true
			}
		}
	}
	if !found {
		return errors.New("the CA file holds no PEM certificate")
	}
	return nil
}

func redactPassword(s, password string) string {
	if password == "" {
		return s
	}
	s = strings.ReplaceAll(s, password, "xxxxx")
	if esc := url.QueryEscape(password); esc != password {
		s = strings.ReplaceAll(s, esc, "xxxxx")
	}
	if esc := url.PathEscape(password); esc != password {
		s = strings.ReplaceAll(s, esc, "xxxxx")
	}
	return s
}

// parseDSN reads the settings a connection string states, each key with
// every value it was given (in the URL form the authority's host list and
// user count as "host" and "user"), and the password, to keep it out of
// errors. It follows libpq's grammar (conninfo_parse and conninfo_uri_parse).
func parseDSN(dsn string) (map[string][]string, string, error) {
	keys := map[string][]string{}
	add := func(k, v string) { keys[k] = append(keys[k], v) }
	lower := strings.ToLower(dsn)
	if strings.HasPrefix(lower, "postgres://") || strings.HasPrefix(lower, "postgresql://") {
		_, rest, _ := strings.Cut(dsn, "://")
		rest, query, _ := strings.Cut(rest, "?")
		authority, path, _ := strings.Cut(rest, "/")
		password := ""
		if at := strings.LastIndexByte(authority, '@'); at >= 0 {
			userinfo := authority[:at]
			authority = authority[at+1:]
			user, pw, hasPW := strings.Cut(userinfo, ":")
			if hasPW {
				p, err := url.PathUnescape(pw)
				if err != nil {
					return nil, pw, errors.New("the password in the URL is not percent-encoded correctly")
				}
				password = p
				add("password", p)
			}
			if u, err := url.PathUnescape(user); err == nil && u != "" {
				add("user", u)
			}
		}
		if authority != "" {
			var hosts []string
			for hp := range strings.SplitSeq(authority, ",") {
				host := hp
				if strings.HasPrefix(hp, "[") { // [v6]:port
					end := strings.IndexByte(hp, ']')
					if end < 0 {
						return nil, password, fmt.Errorf("host %q: unterminated [", hp)
					}
					host = hp[1:end]
				} else if i := strings.LastIndexByte(hp, ':'); i >= 0 {
					host = hp[:i]
				}
				h, err := url.PathUnescape(host)
				if err != nil {
					return nil, password, fmt.Errorf("host %q is not percent-encoded correctly", host)
				}
				hosts = append(hosts, h)
			}
			if strings.Join(hosts, "") != "" {
				add("host", strings.Join(hosts, ","))
			}
		}
		if path != "" {
			add("dbname", path)
		}
		if query != "" {
			q, err := url.ParseQuery(query)
			if err != nil {
				return nil, password, fmt.Errorf("the URL's query does not parse: %v", err)
			}
			for k, vs := range q {
				for _, v := range vs {
					add(k, v)
				}
			}
			if vs := q["password"]; len(vs) > 0 {
				password = vs[0]
			}
		}
		return keys, password, nil
	}
	// keyword = value pairs, separated by white space; values may be single
	// quoted; a backslash escapes the next character.
	isSpace := func(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v' }
	password := ""
	for i := 0; ; {
		for i < len(dsn) && isSpace(dsn[i]) {
			i++
		}
		if i == len(dsn) {
			break
		}
		start := i
		for i < len(dsn) && dsn[i] != '=' && !isSpace(dsn[i]) {
			i++
		}
		key := dsn[start:i]
		for i < len(dsn) && isSpace(dsn[i]) {
			i++
		}
		if i == len(dsn) || dsn[i] != '=' {
			return nil, password, fmt.Errorf("missing \"=\" after %q", key)
		}
		i++
		for i < len(dsn) && isSpace(dsn[i]) {
			i++
		}
		var v strings.Builder
		if i < len(dsn) && dsn[i] == '\'' {
			i++
			closed := false
			for i < len(dsn) {
				c := dsn[i]
				i++
				if c == '\\' && i < len(dsn) {
					v.WriteByte(dsn[i])
					i++
					continue
				}
				if c == '\'' {
					closed = true
					break
				}
				v.WriteByte(c)
			}
			if !closed {
				return nil, password, fmt.Errorf("unterminated quoted value of %q", key)
			}
		} else {
			for i < len(dsn) && !isSpace(dsn[i]) {
				c := dsn[i]
				i++
				if c == '\\' && i < len(dsn) {
					c = dsn[i]
					i++
				}
				v.WriteByte(c)
			}
		}
		if key == "password" {
			password = v.String()
		}
		add(key, v.String())
	}
	return keys, password, nil
}

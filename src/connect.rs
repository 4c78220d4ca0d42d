//! Connection settings beyond what `tokio_postgres::Config` parses: libpq's
//! `sslmode=verify-ca|verify-full` and `sslrootcert`, and choosing the TLS
//! connector from them.

use std::path::PathBuf;

use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::Config;

use crate::error::{Error, Origin, Result};
use crate::tls::Connector;

/// libpq's `sslmode`: whether to use TLS and how much of the server's
/// certificate to check. Set in the URL (`?sslmode=verify-full`), the
/// key=value string, or with [`Builder::ssl_mode`](crate::Builder::ssl_mode).
///
/// Everything but `Disable` and `Prefer` needs the `tls` feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS if the server offers it (and the `tls` feature is on), not
    /// verified; plain otherwise. The default. libpq's `allow` maps here.
    Prefer,
    /// TLS or fail; the certificate is not checked, unless a root
    /// certificate is given (`sslrootcert`), which makes it `VerifyCa`, as in libpq.
    Require,
    /// TLS, and the server's certificate must chain to a trusted root
    /// (`sslrootcert`, else the Mozilla and platform roots); any host name.
    VerifyCa,
    /// `VerifyCa`, and the certificate must name the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::new(
                    Origin::Config,
                    format!(
                        "invalid sslmode {other:?}: expected disable, allow, prefer, require, \
                         verify-ca or verify-full"
                    ),
                ))
            }
        })
    }

    fn from_pg(mode: PgSslMode) -> SslMode {
        match mode {
            PgSslMode::Disable => SslMode::Disable,
            PgSslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        }
    }
}

/// A parsed connection string: what tokio-postgres understands, plus the
/// TLS settings it does not. Built by [`IntoConfig`](crate::IntoConfig).
#[derive(Debug, Clone)]
pub struct Target {
    pub(crate) pg: Config,
    pub(crate) ssl_mode: SslMode,
    pub(crate) root_cert: Option<PathBuf>,
}

impl From<Config> for Target {
    fn from(pg: Config) -> Self {
        Target {
            ssl_mode: SslMode::from_pg(pg.get_ssl_mode()),
            pg,
            root_cert: None,
        }
    }
}

impl Target {
    /// Parses a URL or key=value string, taking `sslmode` and `sslrootcert`
    /// out first (tokio-postgres rejects `verify-*` and `sslrootcert`).
    pub(crate) fn parse(conn: &str) -> Result<Target> {
        let (rest, settings) =
            if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
                take_from_url(conn)
            } else {
                take_from_key_values(conn)
            };
        let mut ssl_mode = SslMode::Prefer;
        let mut root_cert = None;
        for (key, value) in settings {
            match key.as_str() {
                "sslmode" => ssl_mode = SslMode::parse(&value)?,
                _ => root_cert = Some(PathBuf::from(value)),
            }
        }
        // The error never contains the string itself, so no password leaks.
        // The reason ("unknown option `x`") is the source: keep it.
        let mut pg: Config = rest.parse().map_err(|e: tokio_postgres::Error| {
            Error::new(Origin::Config, crate::error::describe_pg_error(&e)).with_source(e)
        })?;
        pg.ssl_mode(match ssl_mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            _ => PgSslMode::Require,
        });
        Ok(Target {
            pg,
            ssl_mode,
            root_cert,
        })
    }

    /// The connector for this target and the config to use it with (its
    /// `sslmode` mapped to what tokio-postgres knows). `custom` is a
    /// connector given by the user, used as it is.
    pub(crate) fn connector(&self, custom: Option<&Connector>) -> Result<(Config, Connector)> {
        let mut pg = self.pg.clone();
        let needs_tls = !matches!(self.ssl_mode, SslMode::Disable | SslMode::Prefer);
        pg.ssl_mode(match self.ssl_mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            _ => PgSslMode::Require,
        });
        let connector = match custom {
            Some(custom) => custom.clone(),
            None if self.ssl_mode == SslMode::Disable => Connector::plain(),
            None => self.rustls(needs_tls)?,
        };
        if !connector.can_tls {
            pg.ssl_mode(PgSslMode::Disable);
        }
        Ok((pg, connector))
    }

    #[cfg(feature = "tls")]
    fn rustls(&self, _needs_tls: bool) -> Result<Connector> {
        use crate::tls::Verify;
        let verify = match self.ssl_mode {
            SslMode::VerifyFull => Verify::Full,
            SslMode::VerifyCa => Verify::Chain,
            // libpq: with a root certificate, `require` verifies the chain.
            _ if self.root_cert.is_some() => Verify::Chain,
            _ => Verify::Nothing,
        };
        crate::tls::rustls_connector(verify, self.root_cert.as_deref())
    }

    #[cfg(not(feature = "tls"))]
    fn rustls(&self, needs_tls: bool) -> Result<Connector> {
        if needs_tls {
            return Err(Error::new(
                Origin::Config,
                format!(
                    "sslmode={} needs TLS, but pg-pubsub was built without its `tls` feature: \
                     enable it (pg-pubsub = {{ features = [\"tls\"] }}) or pass a connector \
                     with Builder::tls",
                    self.ssl_mode_name()
                ),
            ));
        }
        Ok(Connector::plain())
    }

    #[cfg(not(feature = "tls"))]
    fn ssl_mode_name(&self) -> &'static str {
        match self.ssl_mode {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Makes every connection of this crate check that it reached a server
/// that takes writes (`target_session_attrs=read-write`): everything it
/// does writes (NOTIFY, durable and queue tables) and a hot standby refuses
/// even `LISTEN`. With several hosts (`host=a,b`, `postgres://a,b/db`) each
/// connect tries them in order and keeps the first primary, so a failover
/// is followed by the next reconnect. `read-only` contradicts that: refused.
pub(crate) fn require_primary(pg: &mut Config) -> Result<()> {
    use tokio_postgres::config::TargetSessionAttrs;
    match pg.get_target_session_attrs() {
        TargetSessionAttrs::ReadOnly => Err(Error::new(
            Origin::Config,
            "target_session_attrs=read-only: pg-pubsub writes on every connection (NOTIFY, \
             its tables) and LISTEN fails on a standby; use read-write (the default here)",
        )),
        _ => {
            pg.target_session_attrs(TargetSessionAttrs::ReadWrite);
            Ok(())
        }
    }
}

/// The host (a TCP name or a Unix socket folder) and port of the first of
/// `pg`'s hosts that is a primary, found by connecting to each in turn with
/// `target_session_attrs=read-write`. For connections tokio-postgres does not
/// open itself (the WAL feed's replication connection), which would
/// otherwise go to the first host, whatever it is now.
#[cfg_attr(not(feature = "wal"), allow(dead_code))]
pub(crate) async fn find_primary(
    pg: &Config,
    tls: &Connector,
    timeout: std::time::Duration,
) -> Result<(tokio_postgres::config::Host, u16)> {
    use tokio_postgres::config::{Host, TargetSessionAttrs};
    const WHAT: &str = "finding the primary";
    let mut last = None;
    for (i, host) in pg.get_hosts().iter().enumerate() {
        let port = pg
            .get_ports()
            .get(i)
            .or_else(|| pg.get_ports().first())
            .copied()
            .unwrap_or(5432);
        let mut one = Config::new();
        match host {
            Host::Tcp(name) => one.host(name),
            #[cfg(unix)]
            Host::Unix(dir) => one.host_path(dir),
        };
        one.port(port)
            .ssl_mode(pg.get_ssl_mode())
            .connect_timeout(pg.get_connect_timeout().copied().unwrap_or(timeout))
            .target_session_attrs(TargetSessionAttrs::ReadWrite);
        if let Some(user) = pg.get_user() {
            one.user(user);
        }
        if let Some(password) = pg.get_password() {
            one.password(password);
        }
        if let Some(db) = pg.get_dbname() {
            one.dbname(db);
        }
        if let Some(name) = pg.get_application_name() {
            one.application_name(name);
        }
        match tokio::time::timeout(timeout, one.connect(tls.clone())).await {
            Ok(Ok((client, conn))) => {
                // Dropping the client makes the connection say goodbye and end.
                drop(client);
                let _ = tokio::time::timeout(timeout, conn).await;
                return Ok((host.clone(), port));
            }
            Ok(Err(e)) => last = Some(Error::pg(Origin::Connect, WHAT, e)),
            Err(_) => last = Some(Error::timeout(WHAT, timeout, None)),
        }
    }
    Err(last
        .map(|e| e.context("no host is a primary that accepts writes"))
        .unwrap_or_else(|| Error::new(Origin::Config, format!("{WHAT}: no host given"))))
}

const OURS: [&str; 2] = ["sslmode", "sslrootcert"];

/// Removes `sslmode` and `sslrootcert` from a URL's query.
fn take_from_url(url: &str) -> (String, Vec<(String, String)>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), Vec::new());
    };
    let mut taken = Vec::new();
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if OURS.contains(&key) {
            taken.push((key.to_owned(), percent_decode(value)));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, taken)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes `sslmode` and `sslrootcert` from a key=value string
/// (`key = value`, values optionally single-quoted with `\` escapes).
fn take_from_key_values(s: &str) -> (String, Vec<(String, String)>) {
    let bytes = s.as_bytes();
    let mut rest = String::with_capacity(s.len());
    let mut taken = Vec::new();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        let start = skip_ws(i);
        if start >= bytes.len() {
            break;
        }
        let mut j = start;
        while j < bytes.len() && bytes[j] != b'=' && !bytes[j].is_ascii_whitespace() {
            j += 1;
        }
        let key = &s[start..j];
        j = skip_ws(j);
        if j >= bytes.len() || bytes[j] != b'=' {
            // Malformed: leave the rest to tokio-postgres' parser to report.
            rest.push(' ');
            rest.push_str(&s[start..]);
            break;
        }
        j = skip_ws(j + 1);
        let mut value = String::new();
        if j < bytes.len() && bytes[j] == b'\'' {
            j += 1;
            while j < bytes.len() && bytes[j] != b'\'' {
                if bytes[j] == b'\\' && j + 1 < bytes.len() {
                    j += 1;
                }
                let c = s[j..].chars().next().unwrap_or('\0');
                value.push(c);
                j += c.len_utf8();
            }
            j = (j + 1).min(bytes.len());
        } else {
            while j < bytes.len() && !bytes[j].is_ascii_whitespace() {
                if bytes[j] == b'\\' && j + 1 < bytes.len() {
                    j += 1;
                }
                let c = s[j..].chars().next().unwrap_or('\0');
                value.push(c);
                j += c.len_utf8();
            }
        }
        if OURS.contains(&key) {
            taken.push((key.to_owned(), value));
        } else {
            rest.push(' ');
            rest.push_str(&s[start..j]);
        }
        i = j;
    }
    (rest.trim_start().to_owned(), taken)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn a_bad_connection_string_says_why() {
        let err = Target::parse("postgres://u:secret@db/app?bogus=1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid connection string: unknown option `bogus`"
        );
    }

    #[test]
    fn takes_tls_settings_out_of_urls() {
        let t = Target::parse(
            "postgres://u:pw@db:5433/app?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem",
        )
        .unwrap();
        assert_eq!(t.ssl_mode, SslMode::VerifyFull);
        assert_eq!(
            t.root_cert.as_deref(),
            Some(std::path::Path::new("/tmp/ca.pem"))
        );
        assert_eq!(t.pg.get_application_name(), Some("x"));
        assert_eq!(t.pg.get_dbname(), Some("app"));

        let t = Target::parse("postgresql://db/app?sslmode=verify-ca").unwrap();
        assert_eq!(t.ssl_mode, SslMode::VerifyCa);
        let t = Target::parse("postgres://db/app").unwrap();
        assert_eq!(t.ssl_mode, SslMode::Prefer);
    }

    #[test]
    fn takes_tls_settings_out_of_key_values() {
        let t = Target::parse(
            "host=db sslmode = verify-full sslrootcert='/my dir/ca.pem' password='a b\\'c' dbname=app",
        )
        .unwrap();
        assert_eq!(t.ssl_mode, SslMode::VerifyFull);
        assert_eq!(
            t.root_cert.as_deref(),
            Some(std::path::Path::new("/my dir/ca.pem"))
        );
        assert_eq!(t.pg.get_password(), Some(&b"a b'c"[..]));
        assert_eq!(t.pg.get_dbname(), Some("app"));
    }

    #[test]
    fn every_connection_requires_a_primary() {
        use tokio_postgres::config::TargetSessionAttrs;
        let mut t = Target::parse("postgres://a:5432,b:5433/app").unwrap();
        require_primary(&mut t.pg).unwrap();
        assert_eq!(
            t.pg.get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
        let mut t = Target::parse("host=a,b target_session_attrs=read-only").unwrap();
        let err = require_primary(&mut t.pg).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("read-only"), "{err}");
    }

    #[test]
    fn rejects_unknown_sslmode_without_echoing_the_string() {
        let err = Target::parse("postgres://u:secret@db/app?sslmode=bogus").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(!err.to_string().contains("secret"));
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn tls_modes_need_the_feature() {
        for mode in ["require", "verify-ca", "verify-full"] {
            let t = Target::parse(&format!("postgres://db/app?sslmode={mode}")).unwrap();
            let err = t.connector(None).err().unwrap();
            assert_eq!(err.kind(), ErrorKind::Config);
            assert!(err.to_string().contains("`tls` feature"), "{err}");
        }
        let (pg, _) = Target::parse("postgres://db/app")
            .unwrap()
            .connector(None)
            .unwrap();
        assert_eq!(pg.get_ssl_mode(), PgSslMode::Disable);
    }
}

//! The replication connection: a TCP (or Unix socket) connection with
//! `replication=database`, TLS through the crate's rustls (`ring`), password
//! authentication (cleartext, MD5, SCRAM-SHA-256 from `postgres-protocol`),
//! `START_REPLICATION`, then the CopyBoth stream's frames read in place from
//! one buffer and standby status updates written back.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::config::{Host, SslMode};

use crate::changes::Lsn;
use crate::error::{Error, Origin, Result};

/// Who to connect as and what to stream.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) user: String,
    pub(crate) password: Option<Vec<u8>>,
    pub(crate) database: String,
    pub(crate) slot: String,
    pub(crate) publication: String,
    pub(crate) ssl_mode: SslMode,
    /// The handle's rustls set-up; `None` without the `tls` feature or with
    /// a custom connector.
    #[cfg(feature = "tls")]
    pub(crate) rustls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    pub(crate) connect_timeout: Duration,
}

impl Settings {
    /// Refuses, before any connection, a `sslmode` the feed cannot honour.
    pub(crate) fn check(&self) -> Result<()> {
        if self.ssl_mode == SslMode::Require && !self.can_tls() {
            return Err(Error::new(
                Origin::Config,
                if cfg!(feature = "tls") {
                    "the WAL feed's TLS uses the crate's rustls (from sslmode, or \
                     Builder::tls_config); a connector given with Builder::tls cannot \
                     open the replication connection"
                } else {
                    "sslmode requires TLS, but pg-pubsub was built without its `tls` \
                     feature: the WAL feed cannot encrypt its replication connection"
                },
            ));
        }
        Ok(())
    }

    fn can_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.rustls.is_some();
        #[cfg(not(feature = "tls"))]
        false
    }
}

/// The socket: plain TCP, a Unix socket, or TLS over TCP. An enum, not a
/// box: the stream's reads are the hot path.
enum Sock {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
    #[cfg(feature = "tls")]
    Tls(Box<TlsStream>),
}

/// tokio-postgres-rustls' stream over TCP (its type is not nameable otherwise).
#[cfg(feature = "tls")]
type TlsStream = <tokio_postgres_rustls::MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<
    TcpStream,
>>::Stream;

impl AsyncRead for Sock {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Sock::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(unix)]
            Sock::Unix(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(feature = "tls")]
            Sock::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Sock {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Sock::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(unix)]
            Sock::Unix(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(feature = "tls")]
            Sock::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Sock::Tcp(s) => Pin::new(s).poll_flush(cx),
            #[cfg(unix)]
            Sock::Unix(s) => Pin::new(s).poll_flush(cx),
            #[cfg(feature = "tls")]
            Sock::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Sock::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(unix)]
            Sock::Unix(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(feature = "tls")]
            Sock::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// One message of the CopyBoth stream.
#[derive(Debug)]
pub(crate) enum Frame {
    /// XLogData: a pgoutput message starting at `wal_start`.
    XLogData { wal_start: Lsn, data: Bytes },
    /// Primary keepalive: the server's WAL end, and whether it wants an
    /// answer now.
    KeepAlive { wal_end: Lsn, reply: bool },
    /// The server ended the stream (CopyDone, CommandComplete).
    End,
}

/// An open replication stream.
pub(crate) struct Conn {
    sock: Sock,
    buf: BytesMut,
    out: BytesMut,
    /// The position last reported in a standby status update.
    pub(crate) reported: u64,
}

/// Reads grow the buffer by at least this much.
const READ_CHUNK: usize = 128 * 1024;
/// The largest frame accepted (a row of 1 GB values and some).
const MAX_FRAME: usize = (1 << 30) + (64 << 20);

/// 2000-01-01, PostgreSQL's epoch, as seconds after the Unix epoch.
pub(crate) const PG_EPOCH: u64 = 946_684_800;

/// A PostgreSQL timestamp (µs since 2000-01-01) as a time.
pub(crate) fn pg_time(micros: i64) -> SystemTime {
    let base = UNIX_EPOCH + Duration::from_secs(PG_EPOCH);
    if micros >= 0 {
        base + Duration::from_micros(micros as u64)
    } else {
        base - Duration::from_micros(micros.unsigned_abs())
    }
}

fn pg_now() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH + Duration::from_secs(PG_EPOCH))
        .unwrap_or_default();
    since.as_micros().min(i64::MAX as u128) as i64
}

fn io_error(what: &str, e: io::Error) -> Error {
    Error::new(Origin::Wal, format!("{what}: {e}"))
        .with_source(e)
        .connection()
}

fn protocol_error(what: impl Into<String>) -> Error {
    Error::new(Origin::Wal, what.into()).connection()
}

/// A server's ErrorResponse as text: `message (SQLSTATE code)`, plus the
/// detail and hint when given.
fn server_error(body: &[u8]) -> Error {
    let (mut message, mut code, mut detail, mut hint) = (None, None, None, None);
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        rest = tail.get(end + 1..).unwrap_or_default();
        match field {
            b'M' => message = Some(value),
            b'C' => code = Some(value),
            b'D' => detail = Some(value),
            b'H' => hint = Some(value),
            _ => {}
        }
    }
    let mut text = message.unwrap_or_else(|| "unknown server error".to_owned());
    if let Some(code) = &code {
        text.push_str(&format!(" (SQLSTATE {code})"));
    }
    if let Some(detail) = detail {
        text.push_str(&format!("; {detail}"));
    }
    if let Some(hint) = hint {
        text.push_str(&format!("; hint: {hint}"));
    }
    // 28xxx: authentication; 57P01..57P03, 08xxx: the server went away.
    let origin = match code.as_deref() {
        Some(c) if c.starts_with("28") => Origin::Authentication,
        _ => Origin::Wal,
    };
    let e = Error::new(origin, text);
    match code.as_deref() {
        Some(c) if c.starts_with("57P") || c.starts_with("08") => e.connection(),
        _ => e,
    }
}

/// `'` doubled, for a string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl Conn {
    /// Connects to `host:port`, authenticates and starts streaming the slot
    /// from `from`. Returns once the server accepted `START_REPLICATION`.
    pub(crate) async fn open(set: &Settings, host: &Host, port: u16, from: Lsn) -> Result<Conn> {
        let timeout = set.connect_timeout;
        let sock = tokio::time::timeout(timeout, connect(set, host, port))
            .await
            .map_err(|_| Error::timeout("connecting", timeout, None))??;
        let mut conn = Conn {
            sock,
            buf: BytesMut::with_capacity(READ_CHUNK),
            out: BytesMut::with_capacity(256),
            reported: from.0,
        };
        tokio::time::timeout(timeout, conn.start(set, from))
            .await
            .map_err(|_| Error::timeout("starting replication", timeout, None))??;
        Ok(conn)
    }

    async fn start(&mut self, set: &Settings, from: Lsn) -> Result<()> {
        let params = [
            ("user", set.user.as_str()),
            ("database", set.database.as_str()),
            ("replication", "database"),
            ("client_encoding", "UTF8"),
            ("application_name", "pg-pubsub-wal"),
            // Dates and times in ISO form, which the decoder turns into
            // what `to_json` gives (see `decode.rs`).
            ("options", "-c DateStyle=ISO"),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.out)
            .map_err(|e| io_error("startup message", e))?;
        self.flush().await?;
        self.authenticate(set).await?;
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {from} (proto_version '1', \
             publication_names {}, messages 'true')",
            crate::changes::wal::slot::quote_ident(&set.slot),
            literal(&crate::changes::wal::slot::quote_ident(&set.publication)),
        );
        frontend::query(&sql, &mut self.out).map_err(|e| io_error("query", e))?;
        self.flush().await?;
        loop {
            let (tag, body) = self.message().await?;
            match tag {
                b'W' => return Ok(()), // CopyBothResponse
                b'E' => return Err(server_error(&body)),
                _ => {} // notices, parameter status
            }
        }
    }

    async fn authenticate(&mut self, set: &Settings) -> Result<()> {
        let password = || {
            set.password.as_deref().ok_or_else(|| {
                Error::new(
                    Origin::Authentication,
                    "the server asks for a password and none was given",
                )
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, body) = self.message().await?;
            match tag {
                b'R' => {
                    let mut b = &body[..];
                    if b.len() < 4 {
                        return Err(protocol_error("short authentication request"));
                    }
                    match b.get_i32() {
                        0 => {}
                        3 => {
                            let mut pw = password()?.to_vec();
                            pw.push(0);
                            frontend::password_message(&pw, &mut self.out)
                                .map_err(|e| io_error("password", e))?;
                            self.flush().await?;
                        }
                        5 => {
                            let salt: [u8; 4] = b
                                .get(..4)
                                .and_then(|s| s.try_into().ok())
                                .ok_or_else(|| protocol_error("MD5 request without salt"))?;
                            let hash = postgres_protocol::authentication::md5_hash(
                                set.user.as_bytes(),
                                password()?,
                                salt,
                            );
                            let mut pw = hash.into_bytes();
                            pw.push(0);
                            frontend::password_message(&pw, &mut self.out)
                                .map_err(|e| io_error("password", e))?;
                            self.flush().await?;
                        }
                        10 => {
                            let offered = b.split(|&c| c == 0).any(|m| m == b"SCRAM-SHA-256");
                            if !offered {
                                return Err(Error::new(
                                    Origin::Authentication,
                                    "the server offers no SASL mechanism this \
                                     client has (SCRAM-SHA-256)",
                                ));
                            }
                            // No channel binding ("n"): allowed whatever the server offers.
                            let s = ScramSha256::new(password()?, ChannelBinding::unsupported());
                            frontend::sasl_initial_response(
                                "SCRAM-SHA-256",
                                s.message(),
                                &mut self.out,
                            )
                            .map_err(|e| io_error("SASL", e))?;
                            scram = Some(s);
                            self.flush().await?;
                        }
                        11 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| protocol_error("SASL out of order"))?;
                            s.update(b).map_err(|e| {
                                Error::new(Origin::Authentication, format!("SCRAM: {e}"))
                            })?;
                            frontend::sasl_response(s.message(), &mut self.out)
                                .map_err(|e| io_error("SASL", e))?;
                            self.flush().await?;
                        }
                        12 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| protocol_error("SASL out of order"))?;
                            s.finish(b).map_err(|e| {
                                Error::new(
                                    Origin::Authentication,
                                    format!("SCRAM: the server's proof is wrong: {e}"),
                                )
                            })?;
                        }
                        other => {
                            return Err(Error::new(
                                Origin::Authentication,
                                format!(
                                    "authentication method {other} is not supported \
                                     (password, md5, scram-sha-256 are)"
                                ),
                            ))
                        }
                    }
                }
                b'E' => return Err(server_error(&body)),
                b'Z' => return Ok(()),
                _ => {} // ParameterStatus, BackendKeyData, notices
            }
        }
    }

    /// Writes what is queued in `out`.
    async fn flush(&mut self) -> Result<()> {
        self.sock
            .write_all(&self.out)
            .await
            .map_err(|e| io_error("writing to the server", e))?;
        self.out.clear();
        self.sock
            .flush()
            .await
            .map_err(|e| io_error("writing to the server", e))
    }

    /// A whole message already in the buffer, if there is one.
    fn buffered(&mut self) -> Result<Option<(u8, Bytes)>> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if !(4..=MAX_FRAME).contains(&len) {
            return Err(protocol_error(format!(
                "message of {len} bytes from the server"
            )));
        }
        if self.buf.len() < len + 1 {
            self.buf.reserve(len + 1 - self.buf.len());
            return Ok(None);
        }
        let tag = self.buf[0];
        let mut frame = self.buf.split_to(len + 1);
        frame.advance(5);
        Ok(Some((tag, frame.freeze())))
    }

    /// Reads more bytes. Cancel-safe: nothing read is lost if the future
    /// is dropped.
    pub(crate) async fn read_more(&mut self) -> Result<()> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        match self.sock.read_buf(&mut self.buf).await {
            Ok(0) => Err(protocol_error(
                "the replication stream ended (server closed it)",
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(io_error("reading the stream", e)),
        }
    }

    async fn message(&mut self) -> Result<(u8, Bytes)> {
        loop {
            if let Some(m) = self.buffered()? {
                return Ok(m);
            }
            self.read_more().await?;
        }
    }

    /// The next stream frame already in the buffer (no I/O).
    pub(crate) fn frame(&mut self) -> Result<Option<Frame>> {
        loop {
            let Some((tag, body)) = self.buffered()? else {
                return Ok(None);
            };
            match tag {
                b'd' => return parse_copy_data(body).map(Some),
                b'E' => return Err(server_error(&body)),
                b'c' | b'C' => return Ok(Some(Frame::End)),
                _ => {} // notices, parameter status
            }
        }
    }

    /// Sends a standby status update: everything up to `applied` is
    /// written, flushed and applied (the slot may confirm it).
    pub(crate) async fn send_status(&mut self, applied: u64, reply: bool) -> Result<()> {
        let mut payload = [0u8; 34];
        payload[0] = b'r';
        for at in [1, 9, 17] {
            payload[at..at + 8].copy_from_slice(&applied.to_be_bytes());
        }
        payload[25..33].copy_from_slice(&pg_now().to_be_bytes());
        payload[33] = u8::from(reply);
        self.out.extend_from_slice(b"d");
        self.out
            .extend_from_slice(&(4 + payload.len() as u32).to_be_bytes());
        self.out.extend_from_slice(&payload);
        self.flush().await?;
        self.reported = applied;
        Ok(())
    }

    /// Ends the stream: a last status update, CopyDone, waits (briefly) for
    /// the server to finish, then Terminate. The walsender then releases
    /// the slot.
    pub(crate) async fn close(mut self, applied: u64) {
        let ended = async {
            self.send_status(applied, false).await?;
            frontend::copy_done(&mut self.out);
            self.flush().await?;
            loop {
                let (tag, _) = self.message().await?;
                if tag == b'Z' || tag == b'E' {
                    break;
                }
            }
            frontend::terminate(&mut self.out);
            self.flush().await?;
            let _ = self.sock.shutdown().await;
            Ok::<_, Error>(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), ended).await;
    }
}

fn parse_copy_data(body: Bytes) -> Result<Frame> {
    let short = || protocol_error("short replication message");
    match body.first() {
        Some(b'w') if body.len() >= 25 => {
            let wal_start = u64::from_be_bytes(body[1..9].try_into().map_err(|_| short())?);
            Ok(Frame::XLogData {
                wal_start: Lsn(wal_start),
                data: body.slice(25..),
            })
        }
        Some(b'k') if body.len() >= 18 => {
            let wal_end = u64::from_be_bytes(body[1..9].try_into().map_err(|_| short())?);
            Ok(Frame::KeepAlive {
                wal_end: Lsn(wal_end),
                reply: body[17] != 0,
            })
        }
        Some(other) => Err(protocol_error(format!(
            "unexpected replication message {:?}",
            *other as char
        ))),
        None => Err(short()),
    }
}

async fn connect(set: &Settings, host: &Host, port: u16) -> Result<Sock> {
    match host {
        #[cfg(unix)]
        Host::Unix(dir) => {
            // Like libpq: no TLS over a local socket.
            let path = dir.join(format!(".s.PGSQL.{port}"));
            let s = tokio::net::UnixStream::connect(&path)
                .await
                .map_err(|e| io_error(&format!("connecting to {}", path.display()), e))?;
            Ok(Sock::Unix(s))
        }
        Host::Tcp(name) => {
            let mut tcp = TcpStream::connect((name.as_str(), port))
                .await
                .map_err(|e| io_error(&format!("connecting to {name}:{port}"), e))?;
            let _ = tcp.set_nodelay(true);
            if set.ssl_mode == SslMode::Disable || !set.can_tls() {
                return Ok(Sock::Tcp(tcp));
            }
            // SSLRequest: 'S' go on with TLS, 'N' plain (refused under `require`).
            let mut out = BytesMut::new();
            frontend::ssl_request(&mut out);
            tcp.write_all(&out)
                .await
                .map_err(|e| io_error("SSLRequest", e))?;
            let mut answer = [0u8; 1];
            tcp.read_exact(&mut answer)
                .await
                .map_err(|e| io_error("SSLRequest", e))?;
            if answer[0] != b'S' {
                if set.ssl_mode == SslMode::Require {
                    return Err(Error::new(
                        Origin::Tls,
                        format!("{name}:{port} does not support TLS, and sslmode requires it"),
                    ));
                }
                return Ok(Sock::Tcp(tcp));
            }
            tls(set, name, tcp).await
        }
    }
}

#[cfg(feature = "tls")]
async fn tls(set: &Settings, name: &str, tcp: TcpStream) -> Result<Sock> {
    use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
    let Some(make) = &set.rustls else {
        return Ok(Sock::Tcp(tcp));
    };
    let connect = MakeTlsConnect::<TcpStream>::make_tls_connect(&mut make.clone(), name)
        .map_err(|e| Error::new(Origin::Config, format!("TLS for {name}: {e}")).with_source(e))?;
    let stream = connect.connect(tcp).await.map_err(|e| {
        Error::new(
            Origin::Tls,
            format!(
                "TLS handshake with {name}: {e} (check sslrootcert, the CA, and that the host \
                 name matches the certificate)"
            ),
        )
        .with_source(e)
    })?;
    Ok(Sock::Tls(Box::new(stream)))
}

#[cfg(not(feature = "tls"))]
async fn tls(_: &Settings, _: &str, tcp: TcpStream) -> Result<Sock> {
    Ok(Sock::Tcp(tcp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_keep_code_detail_and_hint() {
        let body = b"SERROR\0C55006\0Mreplication slot \"s\" is active for PID 7\0Hwait\0\0";
        let e = server_error(body);
        let text = e.to_string();
        assert!(
            text.contains("is active for PID 7 (SQLSTATE 55006)"),
            "{text}"
        );
        assert!(text.contains("hint: wait"), "{text}");
        assert_eq!(e.kind(), crate::ErrorKind::Server);
        assert_eq!(
            server_error(b"C28P01\0Mbad\0\0").kind(),
            crate::ErrorKind::Authentication
        );
        assert!(server_error(b"C57P01\0Mbye\0\0").is_connection());
        assert!(server_error(b"")
            .to_string()
            .contains("unknown server error"));
    }

    #[test]
    fn copy_data_frames_parse() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&0x16_0000_0010u64.to_be_bytes());
        w.extend_from_slice(&[0; 16]);
        w.extend_from_slice(b"Bxyz");
        match parse_copy_data(Bytes::from(w)).unwrap() {
            Frame::XLogData { wal_start, data } => {
                assert_eq!(wal_start, Lsn(0x16_0000_0010));
                assert_eq!(&data[..], b"Bxyz");
            }
            other => panic!("{other:?}"),
        }
        let mut k = vec![b'k'];
        k.extend_from_slice(&7u64.to_be_bytes());
        k.extend_from_slice(&[0; 8]);
        k.push(1);
        assert!(matches!(
            parse_copy_data(Bytes::from(k)).unwrap(),
            Frame::KeepAlive {
                wal_end: Lsn(7),
                reply: true
            }
        ));
        assert!(parse_copy_data(Bytes::from_static(b"w12")).is_err());
    }

    #[test]
    fn literals_double_quotes() {
        assert_eq!(literal("a'b"), "'a''b'");
    }
}

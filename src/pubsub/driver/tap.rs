//! The listener connection's socket, opened by this crate so that its
//! notifications skip tokio-postgres: the tap reads the socket, copies
//! `NotificationResponse` frames verbatim to a buffer the listener task
//! drains (see [`frame`](crate::frame)), and passes every other byte on to
//! tokio-postgres, which still runs start-up, authentication and
//! statements. tokio-postgres would turn each notification into two
//! `String`s (allocated in the listener task, freed in the consumer's) and
//! poll its request queue per message.
//!
//! Used for plain connections (no TLS) with hosts tried in order; other
//! connections are opened by tokio-postgres, whose notifications are copied
//! into the same frames. Passing a frame on instead of taking it is always
//! safe: tokio-postgres then reports it as a notification.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
#[cfg(unix)]
use tokio::net::UnixStream;
use tokio_postgres::config::{Host, LoadBalanceHosts, SslMode, TargetSessionAttrs};
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{Client, Config, NoTls, SimpleQueryMessage};

use crate::error::{Error, Origin};
use crate::frame;

use super::live::{drive, PgConnection};

pub(crate) type TapConnection = tokio_postgres::Connection<TapIo, NoTlsStream>;

/// Notification frames read from the socket, not yet taken by the listener.
pub(crate) type Notes = Arc<Mutex<BytesMut>>;

/// Socket reads per `poll_read` call before yielding: a busy channel cannot
/// keep the listener task from its other work.
const READ_BUDGET: usize = 256 * 1024;
/// The read buffer: a notification frame (below 8.1 kB) always fits.
const BUF_SIZE: usize = 64 * 1024;
/// Larger notification frames are passed on (to tokio-postgres).
const MAX_TAKEN: usize = 16 * 1024;

enum Io {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(UnixStream),
}

/// The socket with its tap.
pub(crate) struct TapIo {
    io: Io,
    notes: Notes,
    buf: Box<[u8]>,
    /// Unsorted bytes are `buf[start..end]`, starting at a frame boundary.
    start: usize,
    end: usize,
    /// Bytes for tokio-postgres.
    pass: BytesMut,
    /// Bytes of the current frame still to pass on as they arrive.
    passing: usize,
    /// Everything goes to tokio-postgres from here on (a frame we do not
    /// understand: it reports the error).
    bypass: bool,
    eof: bool,
}

impl TapIo {
    fn new(io: Io, notes: Notes) -> Self {
        TapIo {
            io,
            notes,
            buf: vec![0; BUF_SIZE].into_boxed_slice(),
            start: 0,
            end: 0,
            pass: BytesMut::new(),
            passing: 0,
            bypass: false,
            eof: false,
        }
    }

    /// Moves the complete frames read so far: notifications to `notes`,
    /// the rest to `pass`.
    fn sort(&mut self) {
        let mut notes = None;
        loop {
            let avail = &self.buf[self.start..self.end];
            if self.bypass {
                self.pass.extend_from_slice(avail);
                self.start = self.end;
                break;
            }
            if self.passing > 0 {
                let n = self.passing.min(avail.len());
                self.pass.extend_from_slice(&avail[..n]);
                self.start += n;
                self.passing -= n;
                if self.passing > 0 {
                    break;
                }
                continue;
            }
            let Some(len) = frame_len(avail) else { break };
            if len < frame::HEADER {
                self.bypass = true;
                continue;
            }
            if avail[0] != frame::TAG || len > MAX_TAKEN {
                self.passing = len;
                continue;
            }
            // A run of whole notification frames, copied at once.
            let mut run = 0;
            while let Some(len) = frame_len(&avail[run..]) {
                if avail[run] != frame::TAG
                    || len < frame::HEADER
                    || len > MAX_TAKEN
                    || avail.len() - run < len
                {
                    break;
                }
                run += len;
            }
            if run == 0 {
                break;
            }
            let notes =
                notes.get_or_insert_with(|| self.notes.lock().unwrap_or_else(|e| e.into_inner()));
            notes.extend_from_slice(&avail[..run]);
            self.start += run;
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < MAX_TAKEN {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }
}

/// The length of the frame at the start of `buf` (tag included), once its
/// header is there.
fn frame_len(buf: &[u8]) -> Option<usize> {
    match buf.get(..frame::HEADER) {
        Some(&[_, a, b, c, d]) => Some(1 + u32::from_be_bytes([a, b, c, d]) as usize),
        _ => None,
    }
}

impl AsyncRead for TapIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let mut read = 0;
        loop {
            if !this.pass.is_empty() {
                let n = this.pass.len().min(out.remaining());
                out.put_slice(&this.pass[..n]);
                this.pass.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // A partial frame is left: tokio-postgres reports it.
                this.bypass = true;
                this.sort();
                if !this.pass.is_empty() {
                    continue;
                }
                return Poll::Ready(Ok(()));
            }
            if read >= READ_BUDGET {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let mut dst = ReadBuf::new(&mut this.buf[this.end..]);
            let res = match &mut this.io {
                Io::Tcp(s) => Pin::new(s).poll_read(cx, &mut dst),
                #[cfg(unix)]
                Io::Unix(s) => Pin::new(s).poll_read(cx, &mut dst),
            };
            match res {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = dst.filled().len();
                    if n == 0 {
                        this.eof = true;
                    }
                    this.end += n;
                    read += n;
                    this.sort();
                }
            }
        }
    }
}

impl AsyncWrite for TapIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(unix)]
            Io::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            #[cfg(unix)]
            Io::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(unix)]
            Io::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Whether the tap can open connections for `config`: no TLS, and hosts
/// tried in order (as tokio-postgres would).
pub(crate) fn usable(config: &Config, plain: bool) -> bool {
    plain
        && config.get_ssl_mode() == SslMode::Disable
        && config.get_load_balance_hosts() == LoadBalanceHosts::Disable
        && (config.get_hostaddrs().is_empty()
            || config.get_hostaddrs().len() == config.get_hosts().len())
}

const WHAT: &str = "connecting the listener";

/// Opens a tapped connection as tokio-postgres' `Config::connect` would:
/// each host (or `hostaddr`) in turn, each of its addresses, keeping the
/// first that accepts the session attributes asked for.
pub(crate) async fn connect(config: &Config) -> Result<(Client, PgConnection), Error> {
    let hosts = config.get_hosts();
    let count = hosts.len().max(config.get_hostaddrs().len());
    if count == 0 {
        return Err(Error::new(Origin::Config, "no host to connect to"));
    }
    let mut last = None;
    for i in 0..count {
        let port = config
            .get_ports()
            .get(i)
            .or_else(|| config.get_ports().first())
            .copied()
            .unwrap_or(5432);
        let host = match config.get_hostaddrs().get(i) {
            Some(ip) => Host::Tcp(ip.to_string()),
            None => match hosts.get(i) {
                Some(host) => host.clone(),
                None => continue,
            },
        };
        let sockets: Vec<Target> = match host {
            Host::Tcp(name) => match tokio::net::lookup_host((name.as_str(), port)).await {
                Ok(addrs) => addrs.map(Target::Tcp).collect(),
                Err(e) => {
                    last = Some(io_error(&format!("resolving {name}"), e));
                    continue;
                }
            },
            #[cfg(unix)]
            Host::Unix(dir) => vec![Target::Unix(dir.join(format!(".s.PGSQL.{port}")))],
        };
        for target in sockets {
            match connect_one(config, &target).await {
                Ok(conn) => return Ok(conn),
                Err(e) => last = Some(e),
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::new(Origin::Connect, format!("{WHAT}: no address"))))
}

enum Target {
    Tcp(std::net::SocketAddr),
    #[cfg(unix)]
    Unix(std::path::PathBuf),
}

fn io_error(what: &str, e: io::Error) -> Error {
    Error::new(Origin::Connect, format!("{WHAT}: {what}: {e}"))
        .with_source(e)
        .connection()
}

async fn connect_one(config: &Config, target: &Target) -> Result<(Client, PgConnection), Error> {
    let timeout = config.get_connect_timeout().copied();
    let io = match target {
        Target::Tcp(addr) => {
            let stream = with_timeout(timeout, TcpStream::connect(addr))
                .await
                .map_err(|e| io_error(&addr.to_string(), e))?;
            stream
                .set_nodelay(true)
                .map_err(|e| io_error("TCP_NODELAY", e))?;
            let sock = socket2::SockRef::from(&stream);
            #[cfg(target_os = "linux")]
            if let Some(t) = config.get_tcp_user_timeout() {
                sock.set_tcp_user_timeout(Some(*t))
                    .map_err(|e| io_error("TCP_USER_TIMEOUT", e))?;
            }
            if config.get_keepalives() {
                let mut keepalive =
                    socket2::TcpKeepalive::new().with_time(config.get_keepalives_idle());
                #[cfg(not(any(
                    target_os = "openbsd",
                    target_os = "redox",
                    target_os = "solaris"
                )))]
                if let Some(interval) = config.get_keepalives_interval() {
                    keepalive = keepalive.with_interval(interval);
                }
                #[cfg(not(any(
                    target_os = "openbsd",
                    target_os = "redox",
                    target_os = "solaris",
                    target_os = "windows"
                )))]
                if let Some(retries) = config.get_keepalives_retries() {
                    keepalive = keepalive.with_retries(retries);
                }
                sock.set_tcp_keepalive(&keepalive)
                    .map_err(|e| io_error("keepalive", e))?;
            }
            Io::Tcp(stream)
        }
        #[cfg(unix)]
        Target::Unix(path) => Io::Unix(
            with_timeout(timeout, UnixStream::connect(path))
                .await
                .map_err(|e| io_error(&path.display().to_string(), e))?,
        ),
    };
    let notes = Notes::default();
    let (client, conn) = config
        .connect_raw(TapIo::new(io, notes.clone()), NoTls)
        .await
        .map_err(|e| Error::pg(Origin::Connect, WHAT, e))?;
    let mut conn = PgConnection::Tapped(conn, notes);
    if config.get_target_session_attrs() != TargetSessionAttrs::Any {
        // `require_primary` asks for read-write on every connection.
        let mut held = BytesMut::new();
        let check = client.simple_query("SHOW transaction_read_only");
        match drive(&mut conn, check, &mut held).await? {
            Ok(rows) if writable(&rows) => {}
            Ok(_) => {
                return Err(Error::new(
                    Origin::Connect,
                    format!("{WHAT}: database does not allow writes"),
                )
                .connection())
            }
            Err(e) => return Err(Error::pg(Origin::Connect, WHAT, e)),
        }
    }
    Ok((client, conn))
}

async fn with_timeout<T>(
    timeout: Option<std::time::Duration>,
    fut: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match timeout {
        None => fut.await,
        Some(t) => tokio::time::timeout(t, fut).await.unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection timed out",
            ))
        }),
    }
}

/// Whether `rows` (of `SHOW transaction_read_only`) say the server takes writes.
fn writable(rows: &[SimpleQueryMessage]) -> bool {
    rows.iter().any(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0) == Some("off"),
        _ => false,
    })
}

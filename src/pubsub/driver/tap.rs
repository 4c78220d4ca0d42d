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
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
#[cfg(unix)]
use tokio::net::UnixStream;
use tokio_postgres::config::{Host, LoadBalanceHosts, TargetSessionAttrs};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::{Client, Config, SimpleQueryMessage};

use crate::error::{Error, Origin};
use crate::frame;
use crate::tls::BoxError;

use super::live::{drive, PgConnection};

pub(crate) type TapConnection = tokio_postgres::Connection<TapIo, TapIo>;

/// Notification frames read from the socket, not yet taken by the listener.
pub(crate) type Notes = Arc<Mutex<BytesMut>>;

/// Socket reads per `poll_read` call before yielding: a busy channel cannot
/// keep the listener task from its other work.
const READ_BUDGET: usize = 256 * 1024;
/// The read buffer: a notification frame (below 8.1 kB) always fits.
const BUF_SIZE: usize = 64 * 1024;
/// Larger notification frames are passed on (to tokio-postgres).
const MAX_TAKEN: usize = 16 * 1024;

/// A socket the crate opened.
pub(crate) enum RawIo {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(UnixStream),
}

enum Io {
    Raw(RawIo),
    Tls(Box<dyn TlsIo>),
}

/// A TLS session over a [`RawIo`].
pub(crate) trait TlsIo: AsyncRead + AsyncWrite + TlsStream + Send + Sync + Unpin {}
impl<T> TlsIo for T where T: AsyncRead + AsyncWrite + TlsStream + Send + Sync + Unpin {}

/// A TLS handshake over a [`RawIo`], for one host.
pub(crate) type Handshake =
    Box<dyn FnOnce(RawIo) -> BoxFuture<'static, Result<Box<dyn TlsIo>, BoxError>> + Send + Sync>;

/// Makes [`Handshake`]s (the crate's own connectors: rustls, or none).
pub(crate) trait MakeHandshake: Send + Sync {
    fn make(&self, domain: &str) -> Result<Handshake, BoxError>;
}

impl<T> MakeHandshake for T
where
    T: MakeTlsConnect<RawIo> + Clone + Send + Sync,
    T::Stream: Send + Sync + 'static,
    T::TlsConnect: Send + Sync + 'static,
    <T::TlsConnect as TlsConnect<RawIo>>::Future: Send + 'static,
{
    fn make(&self, domain: &str) -> Result<Handshake, BoxError> {
        let connect = self.clone().make_tls_connect(domain).map_err(Into::into)?;
        Ok(Box::new(move |raw| {
            Box::pin(async move {
                match connect.connect(raw).await {
                    Ok(stream) => Ok(Box::new(stream) as Box<dyn TlsIo>),
                    Err(e) => Err(e.into()),
                }
            })
        }))
    }
}

/// The TLS side of a tapped connection: the handshake runs on the raw
/// socket, and the tap moves above it.
pub(crate) struct TapTls {
    handshake: Option<Handshake>,
}

impl TlsConnect<TapIo> for TapTls {
    type Stream = TapIo;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<TapIo, BoxError>>;

    fn connect(self, stream: TapIo) -> Self::Future {
        Box::pin(async move {
            let handshake = self.handshake.ok_or("TLS is not configured")?;
            let TapIo {
                io,
                notes,
                start,
                end,
                pass,
                ..
            } = stream;
            let Io::Raw(raw) = io else {
                return Err("TLS requested twice".into());
            };
            if start != end || !pass.is_empty() {
                return Err("the server sent data before the TLS handshake".into());
            }
            Ok(TapIo::new(Io::Tls(handshake(raw).await?), notes))
        })
    }
}

impl TlsStream for TapIo {
    fn channel_binding(&self) -> ChannelBinding {
        match &self.io {
            Io::Tls(tls) => tls.channel_binding(),
            Io::Raw(_) => ChannelBinding::none(),
        }
    }
}

macro_rules! raw {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            RawIo::Tcp($s) => $e,
            #[cfg(unix)]
            RawIo::Unix($s) => $e,
        }
    };
}

impl AsyncRead for RawIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        raw!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for RawIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        raw!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        raw!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        raw!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Raw(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Raw(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Raw(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Raw(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The start of an `SSLRequest`: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 4, 210, 22, 47];

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
    /// Nothing was written yet.
    fresh: bool,
    /// An `SSLRequest` went out: its one-byte answer is not a frame.
    ssl_answer: bool,
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
            fresh: true,
            ssl_answer: false,
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
            if self.ssl_answer && !avail.is_empty() {
                self.ssl_answer = false;
                self.pass.extend_from_slice(&avail[..1]);
                self.start += 1;
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
                    || !(frame::HEADER..=MAX_TAKEN).contains(&len)
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
            match Pin::new(&mut this.io).poll_read(cx, &mut dst) {
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
        if std::mem::take(&mut self.fresh) && buf.starts_with(&SSL_REQUEST) {
            self.ssl_answer = true;
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Whether the tap can open connections for `config` (with the crate's own
/// TLS connector): hosts tried in order, as tokio-postgres would.
pub(crate) fn usable(config: &Config) -> bool {
    config.get_load_balance_hosts() == LoadBalanceHosts::Disable
        && (config.get_hostaddrs().is_empty()
            || config.get_hostaddrs().len() == config.get_hosts().len())
}

const WHAT: &str = "connecting the listener";

/// Opens a tapped connection as tokio-postgres' `Config::connect` would:
/// each host (or `hostaddr`) in turn, each of its addresses, keeping the
/// first that accepts the session attributes asked for.
pub(crate) async fn connect(
    config: &Config,
    tls: &dyn MakeHandshake,
) -> Result<(Client, PgConnection), Error> {
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
        // As tokio-postgres: the host name is for TLS, even with a hostaddr.
        let domain = match hosts.get(i) {
            Some(Host::Tcp(host)) => host.clone(),
            _ => String::new(),
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
            let handshake = tls.make(&domain).map_err(|e| {
                Error::new(Origin::Connect, format!("{WHAT}: TLS for {domain:?}: {e}"))
            })?;
            match connect_one(config, &target, handshake).await {
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

async fn connect_one(
    config: &Config,
    target: &Target,
    handshake: Handshake,
) -> Result<(Client, PgConnection), Error> {
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
            RawIo::Tcp(stream)
        }
        #[cfg(unix)]
        Target::Unix(path) => RawIo::Unix(
            with_timeout(timeout, UnixStream::connect(path))
                .await
                .map_err(|e| io_error(&path.display().to_string(), e))?,
        ),
    };
    let notes = Notes::default();
    let (client, conn) = config
        .connect_raw(
            TapIo::new(Io::Raw(io), notes.clone()),
            TapTls {
                handshake: Some(handshake),
            },
        )
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

#[cfg(all(test, unix))]
mod tests {
    //! The tap's sorting on a socket pair, without a server: bytes arrive
    //! in arbitrary pieces; notifications go to the notes, the rest (in
    //! order, whole) to tokio-postgres.

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend(u32::try_from(body.len() + 4).expect("small").to_be_bytes());
        out.extend(body);
        out
    }

    fn notification(channel: &str, payload: &str) -> Vec<u8> {
        let mut frames = BytesMut::new();
        frame::push_parts(&mut frames, 7, channel, payload);
        frames.to_vec()
    }

    /// Sends `first` (if any), then `stream` in `piece`-byte writes, and
    /// returns what the tap passed on and what it took.
    async fn sort(first: &[u8], stream: &[u8], piece: usize, ssl: bool) -> (Vec<u8>, Vec<u8>) {
        let (ours, mut theirs) = UnixStream::pair().expect("a socket pair");
        let notes = Notes::default();
        let mut tap = TapIo::new(Io::Raw(RawIo::Unix(ours)), notes.clone());
        if ssl {
            tap.write_all(&SSL_REQUEST).await.expect("written");
        }
        let stream = [first, stream].concat();
        let writer = tokio::spawn(async move {
            if ssl {
                let mut request = [0; 8];
                theirs.read_exact(&mut request).await.expect("the request");
                assert_eq!(request, SSL_REQUEST);
            }
            for chunk in stream.chunks(piece) {
                theirs.write_all(chunk).await.expect("written");
                tokio::task::yield_now().await;
            }
        });
        let mut passed = Vec::new();
        tap.read_to_end(&mut passed).await.expect("read to the end");
        writer.await.expect("the writer");
        let taken = notes.lock().expect("not poisoned").to_vec();
        (passed, taken)
    }

    #[tokio::test]
    async fn notifications_are_taken_and_everything_else_passed_on_in_order() {
        let big = message(b'D', &vec![b'x'; 70_000]);
        let parts = [
            message(b'R', &0i32.to_be_bytes()),
            notification("orders", "{\"id\":1}"),
            notification("orders", ""),
            message(b'Z', b"I"),
            big.clone(),
            notification("other", &"y".repeat(7990)),
            message(b'C', b"SELECT 1\0"),
        ];
        let stream = parts.concat();
        let expect_passed = [&parts[0], &parts[3], &parts[4], &parts[6]].map(|p| p.as_slice());
        let expect_taken = [&parts[1], &parts[2], &parts[5]].map(|p| p.as_slice());
        for piece in [3, 4096, 1 << 20] {
            let (passed, taken) = sort(&[], &stream, piece, false).await;
            assert_eq!(passed, expect_passed.concat(), "pieces of {piece}");
            assert_eq!(taken, expect_taken.concat(), "pieces of {piece}");
        }
    }

    #[tokio::test]
    async fn the_answer_to_an_ssl_request_is_passed_on_alone() {
        let frames = [notification("a", "1"), message(b'Z', b"I")];
        let (passed, taken) = sort(b"N", &frames.concat(), 1, true).await;
        assert_eq!(passed, [b"N".as_slice(), &frames[1]].concat());
        assert_eq!(taken, frames[0]);
    }

    #[tokio::test]
    async fn a_frame_it_does_not_understand_goes_to_tokio_postgres_with_the_rest() {
        // A length below the header's own: tokio-postgres reports it.
        let bad = [b'A', 0, 0, 0, 1];
        let after = notification("a", "1");
        let (passed, taken) = sort(&[], &[&bad[..], &after].concat(), 2, false).await;
        assert_eq!(passed, [&bad[..], &after].concat());
        assert!(taken.is_empty());
    }
}

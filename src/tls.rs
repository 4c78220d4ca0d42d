//! TLS for every connection (listener and pool): one type-erased connector,
//! so that neither `PgPubSub` nor the driver is generic over the TLS
//! implementation, and, with the `tls` feature, rustls set up for libpq's
//! `sslmode` levels.
//!
//! Without TLS negotiated, tokio-postgres hands back the raw socket
//! (`MaybeTlsStream::Raw`), so the boxed stream costs plain connections nothing.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::Socket;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

trait Stream: AsyncRead + AsyncWrite + TlsStream + Send + Sync + Unpin {}
impl<T> Stream for T where T: AsyncRead + AsyncWrite + TlsStream + Send + Sync + Unpin {}

/// A TLS session of any implementation.
pub(crate) struct DynStream(Box<dyn Stream>);

impl AsyncRead for DynStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for DynStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl TlsStream for DynStream {
    fn channel_binding(&self) -> ChannelBinding {
        self.0.channel_binding()
    }
}

trait MakeDyn: Send + Sync {
    fn make(&self, domain: &str) -> Result<DynConnect, BoxError>;
}

struct Erase<T>(T);

impl<T> MakeDyn for Erase<T>
where
    T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
    T::Stream: Send + Sync + 'static,
    T::TlsConnect: Send + Sync + 'static,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send + 'static,
{
    fn make(&self, domain: &str) -> Result<DynConnect, BoxError> {
        // `make_tls_connect` takes `&mut self`; connectors are cheap handles.
        let connect = self
            .0
            .clone()
            .make_tls_connect(domain)
            .map_err(Into::into)?;
        Ok(DynConnect(Box::new(move |socket| {
            Box::pin(async move {
                match connect.connect(socket).await {
                    Ok(stream) => Ok(DynStream(Box::new(stream))),
                    Err(e) => Err(e.into()),
                }
            })
        })))
    }
}

type ConnectFn =
    Box<dyn FnOnce(Socket) -> BoxFuture<'static, Result<DynStream, BoxError>> + Send + Sync>;

/// One handshake, for one host.
pub(crate) struct DynConnect(ConnectFn);

impl TlsConnect<Socket> for DynConnect {
    type Stream = DynStream;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<DynStream, BoxError>>;

    fn connect(self, stream: Socket) -> Self::Future {
        (self.0)(stream)
    }
}

/// Any TLS implementation, behind one type.
#[derive(Clone)]
pub(crate) struct Connector {
    make: Arc<dyn MakeDyn>,
    /// False for the plain connector: `sslmode=prefer` then means no TLS
    /// (tokio-postgres' `NoTls` says so through a hook we cannot forward).
    pub(crate) can_tls: bool,
    /// The crate's own rustls set-up (from `sslmode` or
    /// `Builder::tls_config`), for connections tokio-postgres does not open:
    /// the WAL feed's replication connection. `None` for a custom connector.
    #[cfg(feature = "tls")]
    pub(crate) rustls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl Connector {
    pub(crate) fn new<T>(tls: T) -> Self
    where
        T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
        T::Stream: Send + Sync + 'static,
        T::TlsConnect: Send + Sync + 'static,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send + 'static,
    {
        Connector {
            make: Arc::new(Erase(tls)),
            can_tls: true,
            #[cfg(feature = "tls")]
            rustls: None,
        }
    }

    /// rustls with this configuration, usable by the WAL feed too.
    #[cfg(feature = "tls")]
    pub(crate) fn rustls(config: rustls::ClientConfig) -> Self {
        let make = tokio_postgres_rustls::MakeRustlsConnect::new(config);
        Connector {
            rustls: Some(make.clone()),
            ..Connector::new(make)
        }
    }

    pub(crate) fn plain() -> Self {
        Connector {
            can_tls: false,
            ..Connector::new(tokio_postgres::NoTls)
        }
    }
}

impl MakeTlsConnect<Socket> for Connector {
    type Stream = DynStream;
    type TlsConnect = DynConnect;
    type Error = BoxError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<DynConnect, BoxError> {
        self.make.make(domain)
    }
}

#[cfg(feature = "tls")]
pub(crate) use with_rustls::{rustls_connector, Verify};

#[cfg(feature = "tls")]
mod with_rustls {
    use std::path::Path;
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::client::WebPkiServerVerifier;
    use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};

    use super::Connector;
    use crate::error::{Error, Origin, Result};

    /// How much of the server's certificate is checked.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Verify {
        /// Encrypt only (libpq `prefer`/`require` without a root certificate).
        Nothing,
        /// The chain, not the host name (`verify-ca`).
        Chain,
        /// Chain and host name (`verify-full`).
        Full,
    }

    /// rustls with the `ring` provider, trusting `root_cert` (a PEM file;
    /// `None` or `"system"`: the Mozilla roots plus the platform's).
    pub(crate) fn rustls_connector(verify: Verify, root_cert: Option<&Path>) -> Result<Connector> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_config_error("choosing TLS versions", e))?;
        let config = match verify {
            Verify::Nothing => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
                .with_no_client_auth(),
            Verify::Chain | Verify::Full => {
                let roots = Arc::new(roots(root_cert)?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| tls_config_error("setting up certificate verification", e))?;
                let verifier: Arc<dyn ServerCertVerifier> = if verify == Verify::Full {
                    webpki
                } else {
                    Arc::new(AnyHostName(webpki))
                };
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_no_client_auth()
            }
        };
        Ok(Connector::rustls(config))
    }

    fn tls_config_error(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::new(Origin::Config, format!("TLS: {what}: {e}")).with_source(e)
    }

    fn roots(root_cert: Option<&Path>) -> Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        match root_cert.filter(|p| *p != Path::new("system")) {
            Some(path) => {
                let shown = path.display();
                let bytes = std::fs::read(path).map_err(|e| {
                    Error::new(
                        Origin::Config,
                        format!("cannot read sslrootcert {shown}: {e}"),
                    )
                    .with_source(e)
                })?;
                for cert in CertificateDer::pem_slice_iter(&bytes) {
                    let cert = cert.map_err(|e| {
                        tls_config_error(&format!("reading sslrootcert {shown}"), e)
                    })?;
                    roots
                        .add(cert)
                        .map_err(|e| tls_config_error(&format!("using sslrootcert {shown}"), e))?;
                }
                if roots.is_empty() {
                    return Err(Error::new(
                        Origin::Config,
                        format!("sslrootcert {shown} holds no PEM certificate"),
                    ));
                }
            }
            None => {
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
                // Unreadable platform certificates are skipped: the Mozilla set remains.
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
            }
        }
        Ok(roots)
    }

    /// Accepts any certificate (libpq's `require`: encrypted, not
    /// authenticated), but still checks the handshake signatures.
    #[derive(Debug)]
    struct NoVerify(Arc<CryptoProvider>);

    impl ServerCertVerifier for NoVerify {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// The chain must verify; the host name may differ (libpq's `verify-ca`).
    #[derive(Debug)]
    struct AnyHostName(Arc<WebPkiServerVerifier>);

    impl ServerCertVerifier for AnyHostName {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp_response: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            // webpki checks the chain before the name, so a name error means
            // the chain was good.
            match self.0.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ) {
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
}

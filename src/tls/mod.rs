//! TLS for the Contact port and for the agent and probe: loading PEM files
//! into rustls configs (checked: readable, key matching the certificate, not
//! expired), the identity a certificate carries, and the operators' small
//! PKI ([`pki`]).
//!
//! TLS is terminated in contactd's own accept loop with tokio-rustls rather
//! than with tonic's TLS feature: tonic fixes its `ServerTlsConfig` when the
//! server is built, and certificates must change on SIGHUP without a restart;
//! the accept loop also has to time out handshakes and carry the client
//! certificate's name to the handlers.

pub mod pki;
pub mod x509;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::WebPkiClientVerifier,
    sign::CertifiedKey,
};

use crate::config::{AgentTlsConfig, ClientAuth, ServerTlsConfig};

/// The one crypto provider contactd uses (ring: builds with a C compiler
/// only, no cmake or assembler).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{} holds no PEM certificate", .0.display())]
    NoCertificate(PathBuf),
    #[error("certificate {} is not valid X.509: {reason}", .path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("certificate {} expired {} ago (not after {})", .path.display(),
        humantime::format_duration(*.ago), humantime::format_rfc3339_seconds(*.not_after))]
    Expired {
        path: PathBuf,
        ago: Duration,
        not_after: SystemTime,
    },
    #[error("certificate {} is not valid yet (not before {})", .path.display(),
        humantime::format_rfc3339_seconds(*.not_before))]
    NotYetValid {
        path: PathBuf,
        not_before: SystemTime,
    },
    #[error("key {} does not belong to certificate {}: {reason}", .key.display(), .cert.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("CA file {}: {reason}", .path.display())]
    BadCa { path: PathBuf, reason: String },
    #[error("{0}")]
    Rustls(String),
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Refuses a certificate outside its validity period, so a rotation to an
/// expired file keeps the old one in force instead of failing every handshake.
fn check_validity(path: &Path, der: &CertificateDer<'_>) -> Result<(), TlsError> {
    let cert = x509::parse(der).ok_or_else(|| TlsError::BadCertificate {
        path: path.to_owned(),
        reason: "not a DER certificate with a readable validity period".to_owned(),
    })?;
    let now = SystemTime::now();
    let not_after = cert.not_after;
    if let Ok(ago) = now.duration_since(not_after) {
        return Err(TlsError::Expired {
            path: path.to_owned(),
            ago,
            not_after,
        });
    }
    let not_before = cert.not_before;
    if not_before > now {
        return Err(TlsError::NotYetValid {
            path: path.to_owned(),
            not_before,
        });
    }
    Ok(())
}

/// A certificate chain and its key, checked to match and to be valid now.
fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs = read_certs(cert)?;
    check_validity(cert, &certs[0])?;
    let key_der = read_key(key)?;
    let mismatch = |reason: String| TlsError::Mismatch {
        cert: cert.to_owned(),
        key: key.to_owned(),
        reason,
    };
    let signing = provider
        .key_provider
        .load_private_key(key_der.clone_key())
        .map_err(|e| mismatch(e.to_string()))?;
    CertifiedKey::new(certs.clone(), signing)
        .keys_match()
        .map_err(|e| mismatch(e.to_string()))?;
    Ok((certs, key_der))
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// The server's rustls config from `[server.tls]`: ALPN `h2`, client
/// certificates verified against `client_ca` as `client_auth` says.
///
/// # Errors
/// A file that cannot be read, a key that does not match, an expired
/// certificate, a CA file without usable certificates.
pub fn server_config(tls: &ServerTlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let (certs, key) = certified_key(&tls.cert, &tls.key, &provider)?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match (&tls.client_ca, tls.client_auth()) {
        (Some(ca), auth @ (ClientAuth::Request | ClientAuth::Require)) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider);
            let verifier = if auth == ClientAuth::Request {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier.build().map_err(|e| TlsError::BadCa {
                path: ca.clone(),
                reason: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Whether `tls`'s client CA (as its file says now) trusts the client
/// certificate chain `chain` (end-entity first). A reload that changes the
/// CA asks this of every connected agent's certificate, to end the streams
/// of those it no longer trusts. Without a client CA, no certificate is
/// checked: trusted.
///
/// # Errors
/// The CA file cannot be read or holds no usable certificate.
pub fn client_trusted(
    tls: &ServerTlsConfig,
    chain: &[CertificateDer<'static>],
) -> Result<bool, TlsError> {
    let Some(ca) = &tls.client_ca else {
        return Ok(true);
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
        .build()
        .map_err(|e| TlsError::BadCa {
            path: ca.clone(),
            reason: e.to_string(),
        })?;
    let Some((end, rest)) = chain.split_first() else {
        return Ok(false);
    };
    Ok(verifier
        .verify_client_cert(end, rest, UnixTime::now())
        .is_ok())
}

/// What a TLS client (the agent, the probe) presents and trusts.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// CA certificates that sign the server's certificate; `None`: the
    /// system's roots.
    pub ca: Option<PathBuf>,
    /// A client certificate and its key, for mTLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Name to verify the server's certificate against (and send as SNI)
    /// instead of the URL's host.
    pub server_name: Option<String>,
    /// Accept any server certificate (the probe's `--tls-no-verify`).
    pub no_verify: bool,
}

/// The agent's `[agent.tls]` as the TLS client settings shared with the probe.
impl From<&AgentTlsConfig> for ClientTls {
    fn from(config: &AgentTlsConfig) -> ClientTls {
        ClientTls {
            ca: config.ca.clone(),
            cert: config.cert.clone(),
            key: config.key.clone(),
            server_name: config.server_name.clone(),
            no_verify: false,
        }
    }
}

impl ClientTls {
    /// A rustls client config from the files, read now (so a rotated client
    /// certificate is used at the next connection).
    ///
    /// # Errors
    /// Unreadable or mismatched files, an expired client certificate, or no
    /// usable CA.
    pub fn config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let builder = if self.no_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider.clone())))
        } else {
            let roots = match &self.ca {
                Some(ca) => roots(ca)?,
                None => system_roots(),
            };
            builder.with_root_certificates(roots)
        };
        let mut config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let (certs, key) = certified_key(cert, key, &provider)?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| TlsError::Rustls(e.to_string()))?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The name to verify the server as: `server_name`, else `host`.
    ///
    /// # Errors
    /// A name that is neither a DNS name nor an IP address.
    pub fn server_name(&self, host: &str) -> Result<ServerName<'static>, TlsError> {
        let name = self.server_name.as_deref().unwrap_or(host);
        let name = name.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(name.to_owned())
            .map_err(|_| TlsError::Rustls(format!("invalid TLS server name {name:?}")))
    }
}

/// The system's CA certificates, read once per process: parsing a few
/// hundred certificates at every reconnect of an agent would be waste (a CA
/// file, by contrast, is read at every connect, so its rotation applies).
fn system_roots() -> RootCertStore {
    static ROOTS: std::sync::OnceLock<RootCertStore> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!(
                    "no system CA certificates found: set a CA file to verify the server"
                );
            }
            roots
        })
        .clone()
}

/// Accepts every server certificate (still checking handshake signatures):
/// only for `contactd health --tls-no-verify`, as grpc_health_probe offers.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
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
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
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

/// The identity a (verified) certificate carries: its first DNS
/// subjectAltName, else its subject's common name.
pub fn identity(der: &CertificateDer<'_>) -> Option<String> {
    let cert = x509::parse(der)?;
    let name = cert
        .dns_names()
        .first()
        .copied()
        .or_else(|| cert.common_name())?;
    Some(name.to_owned())
}

/// rustls' handshake errors in words an operator can act on.
pub fn explain(error: &std::io::Error) -> String {
    let text = crate::error_chain(error);
    if text.contains(") (") {
        return text; // explained already, on the way up
    }
    let hint = if text.contains("Expired") {
        " (the certificate has expired)"
    } else if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        " (the certificate is not signed by a trusted CA: check the CA file)"
    } else if text.contains("NotValidForName") {
        " (the certificate is not valid for this name: set server_name, or issue it for this host)"
    } else if text.contains("CertificateRequired") || text.contains("certificate required") {
        " (the server requires a client certificate: set cert and key)"
    } else {
        ""
    };
    format!("{text}{hint}")
}

/// Connects `endpoint` (whose URL is `url`), over TLS with `tls` for an
/// `https://` URL. The TLS config is built by the caller at each connection,
/// so rotated client files are picked up.
///
/// # Errors
/// The connection's failure; a TLS failure carries rustls' reason.
pub async fn connect(
    endpoint: tonic::transport::Endpoint,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let Some((config, name)) = tls else {
        return endpoint.connect().await;
    };
    let connector = tower::service_fn(move |uri: http::Uri| {
        let (config, name) = (Arc::clone(&config), name.clone());
        async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| std::io::Error::other(explain(&e)))?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    endpoint.connect_with_connector(connector).await
}

/// Whether the server at `addr` (`host:port`) answers a TLS ClientHello
/// with a TLS record, within `timeout`: asked after a plaintext call there
/// failed, so that the failure can say "the server speaks TLS" rather than
/// only "transport error". Sends one ClientHello and reads five bytes; it
/// never completes a handshake, verifies nothing and sends no data.
pub async fn speaks_tls(addr: &str, timeout: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let unverified = ClientTls {
            no_verify: true,
            ..ClientTls::default()
        };
        let config = unverified.config().ok()?;
        let name = ServerName::try_from("localhost").ok()?;
        let mut hello = rustls::ClientConnection::new(config, name).ok()?;
        let mut bytes = Vec::new();
        hello.write_tls(&mut bytes).ok()?;
        let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        tcp.write_all(&bytes).await.ok()?;
        let mut head = [0u8; 5];
        tcp.read_exact(&mut head).await.ok()?;
        // A handshake (22) or alert (21) record of TLS 1.x: an HTTP/2
        // server answers with a SETTINGS frame instead.
        Some(matches!(head[0], 21 | 22) && head[1] == 3)
    };
    matches!(tokio::time::timeout(timeout, probe).await, Ok(Some(true)))
}

/// The TLS settings for connecting to `url`: `None` for `http://`.
///
/// # Errors
/// Unusable files, or a server name that cannot be verified.
pub fn for_url(
    url: &http::Uri,
    tls: &ClientTls,
) -> Result<Option<(Arc<ClientConfig>, ServerName<'static>)>, TlsError> {
    if url.scheme_str() != Some("https") {
        return Ok(None);
    }
    let name = tls.server_name(url.host().unwrap_or_default())?;
    Ok(Some((tls.config()?, name)))
}

//! The TLS variants' certificates, made afresh for every bench run in a temp
//! dir: the CA and the server certificate by the real binary's `contactd tls
//! init`, the status client's certificate by `contactd tls issue`, and one
//! certificate per agent in this process, signed by the same CA with the same
//! parameters as `tls issue` (10,000 `tls issue` processes would take longer
//! than the runs). Both servers get the same `[server.tls]` table, and so the
//! same rustls server config (`contactd::tls::server_config`).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    ClientConfig, RootCertStore,
    client::{Resumption, WebPkiServerVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, pem::PemObject},
};

/// Longest `contactd tls init` or `tls issue` may take.
const PKI_LIMIT: Duration = Duration::from_secs(60);

/// The name the clients verify the server certificate against (`tls init`
/// always includes it).
pub const SERVER_NAME: &str = "localhost";

/// How the servers are set up for a TLS variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Server certificate only (`client_auth = "none"`): anonymous clients.
    ServerAuth,
    /// Client certificates required (`client_ca`, `client_auth = "require"`):
    /// every agent has its own certificate, its name is its identity.
    Mutual,
}

/// What a client presents and trusts in one mode.
#[derive(Clone)]
pub struct ClientTls {
    /// For the status client (mTLS: the `bench-status` certificate).
    pub shared: Arc<ClientConfig>,
    /// One per agent (mTLS); empty: every agent uses `shared`.
    agents: Arc<[Arc<ClientConfig>]>,
    pub name: ServerName<'static>,
}

impl ClientTls {
    /// The config of agent `i` (agents beyond the certificates made reuse
    /// them in turn, on new connections: still full handshakes).
    pub fn agent(&self, i: usize) -> Arc<ClientConfig> {
        if self.agents.is_empty() {
            Arc::clone(&self.shared)
        } else {
            Arc::clone(&self.agents[i % self.agents.len()])
        }
    }
}

/// A CA, the server's certificate, and the clients' configs, in a temp dir
/// that lives as long as this.
pub struct Pki {
    dir: tempfile::TempDir,
    server_auth: ClientTls,
    mutual: ClientTls,
}

impl Pki {
    /// Makes the CA and server certificate with `contactd`, and `agents`
    /// agent certificates.
    pub async fn make(contactd: &Path, agents: usize) -> anyhow::Result<Pki> {
        let dir = tempfile::tempdir()?;
        let pki = dir.path().join("pki");
        let pki_arg = pki.to_str().context("temp dir is not UTF-8")?;
        run(contactd, &["tls", "init", pki_arg]).await?;
        run(
            contactd,
            &["tls", "issue", "bench-status", "--dir", pki_arg],
        )
        .await?;
        for mode in [Mode::ServerAuth, Mode::Mutual] {
            std::fs::write(dir.path().join(file_name(mode)), table(&pki, mode))?;
        }

        let configs = Configs::new(&pki)?;
        let status = (
            CertificateDer::from_pem_file(pki.join("bench-status.pem"))?,
            PrivateKeyDer::from_pem_file(pki.join("bench-status.key"))?,
        );
        let per_agent = configs.agents(&pki, 0, agents)?;
        let name = ServerName::try_from(SERVER_NAME)?;
        Ok(Pki {
            server_auth: ClientTls {
                shared: configs.config(None)?,
                agents: Arc::from(Vec::new()),
                name: name.clone(),
            },
            mutual: ClientTls {
                shared: configs.config(Some(status))?,
                agents: Arc::from(per_agent),
                name,
            },
            dir,
        })
    }

    /// The `[server.tls]` table's body for `mode` (for contactd's config).
    pub fn server_table(&self, mode: Mode) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(
            self.dir.path().join(file_name(mode)),
        )?)
    }

    /// The same table as a file (for `baseline-server --tls`).
    pub fn server_table_file(&self, mode: Mode) -> String {
        self.dir
            .path()
            .join(file_name(mode))
            .to_string_lossy()
            .into_owned()
    }

    /// The directory of the CA and the server's certificate (for the load
    /// processes of the scale scenarios: see [`agents`]).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    pub fn client(&self, mode: Mode) -> &ClientTls {
        match mode {
            Mode::ServerAuth => &self.server_auth,
            Mode::Mutual => &self.mutual,
        }
    }
}

/// The mTLS configs of `count` agents, `first` on, each with its own
/// certificate signed by the CA in `pki` (as [`Pki::make`] makes them): a
/// load process of the scale scenarios makes those of its own agents.
pub fn agents(pki: &Path, first: usize, count: usize) -> anyhow::Result<ClientTls> {
    let configs = Configs::new(pki)?;
    Ok(ClientTls {
        shared: configs.config(None)?,
        agents: Arc::from(configs.agents(pki, first, count)?),
        name: ServerName::try_from(SERVER_NAME)?,
    })
}

/// What every client config of a bench run shares: the provider, and a
/// verifier with the run's CA as the only root.
struct Configs {
    provider: Arc<rustls::crypto::CryptoProvider>,
    verifier: Arc<WebPkiServerVerifier>,
}

impl Configs {
    fn new(pki: &Path) -> anyhow::Result<Configs> {
        let provider = contactd::tls::provider();
        let ca = CertificateDer::from_pem_file(pki.join("ca.pem")).context("reading ca.pem")?;
        let mut roots = RootCertStore::empty();
        roots.add(ca)?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()?;
        Ok(Configs { provider, verifier })
    }

    /// A client config presenting `cert`, if any.
    fn config(
        &self,
        cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    ) -> anyhow::Result<Arc<ClientConfig>> {
        let builder = ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()?
            .with_webpki_verifier(Arc::clone(&self.verifier));
        let mut config = match cert {
            Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key)?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        // Every connection a full handshake, as a fleet's first connect.
        config.resumption = Resumption::disabled();
        Ok(Arc::new(config))
    }

    /// Configs for agents `first..first + count`, each with its own
    /// certificate (named [`agent_name`]) signed by the CA in `pki`.
    fn agents(
        &self,
        pki: &Path,
        first: usize,
        count: usize,
    ) -> anyhow::Result<Vec<Arc<ClientConfig>>> {
        let issuer = contactd::tls::pki::ca_issuer(pki)?;
        (first..first + count)
            .map(|i| self.config(Some(agent_cert(&issuer, &agent_name(i))?)))
            .collect()
    }
}

fn file_name(mode: Mode) -> &'static str {
    match mode {
        Mode::ServerAuth => "server-tls.toml",
        Mode::Mutual => "server-mtls.toml",
    }
}

/// `[server.tls]` as both servers read it.
fn table(pki: &Path, mode: Mode) -> String {
    let path = |name: &str| {
        // TOML basic strings: a temp dir path has no quotes or backslashes,
        // but escape them anyway.
        let p = pki.join(name).to_string_lossy().into_owned();
        format!("\"{}\"", p.replace('\\', "\\\\").replace('"', "\\\""))
    };
    let mut toml = format!(
        "cert = {}\nkey = {}\n",
        path("server.pem"),
        path("server.key")
    );
    match mode {
        Mode::ServerAuth => toml.push_str("client_auth = \"none\"\n"),
        Mode::Mutual => {
            toml.push_str(&format!(
                "client_ca = {}\nclient_auth = \"require\"\n",
                path("ca.pem")
            ));
        }
    }
    toml
}

/// Agent `i`'s name, and so its identity.
pub fn agent_name(i: usize) -> String {
    format!("bench-agent-{i:05}")
}

/// A client certificate for `name` as `contactd tls issue` makes it (CN and
/// DNS SAN = name, digitalSignature, clientAuth, authority key id), with
/// rcgen's default validity.
fn agent_cert(
    issuer: &rcgen::Issuer<'static, KeyPair>,
    name: &str,
) -> anyhow::Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = vec![SanType::DnsName(name.to_owned().try_into()?)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((cert.der().clone(), key))
}

/// Runs `contactd ARGS` to its end, bounded in time.
async fn run(contactd: &Path, args: &[&str]) -> anyhow::Result<()> {
    let mut command = tokio::process::Command::new(contactd);
    command
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(PKI_LIMIT, command.output())
        .await
        .with_context(|| format!("contactd {} took over {PKI_LIMIT:?}", args.join(" ")))??;
    if !output.status.success() {
        bail!(
            "contactd {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

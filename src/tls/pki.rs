//! `contactd tls init` and `contactd tls issue`: a small CA for a fleet,
//! a server certificate, and one certificate per agent whose name is its
//! identity. Made with rcgen (ECDSA P-256), never by shelling out to openssl.
//!
//! Files in DIR: `ca.pem`/`ca.key`, `server.pem`/`server.key`, and
//! `NAME.pem`/`NAME.key` per issued name. Keys are written mode 0600 and
//! nothing is overwritten without `force`.

use std::{
    fs::OpenOptions,
    io::Write,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls::pki_types::{CertificateDer, pem::PemObject};

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{} exists: pass --force to replace it", .0.display())]
    Exists(PathBuf),
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {}: {source} (run `contactd tls init` first)", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid name {0:?}: {1}")]
    BadName(String, String),
    #[error("{}: {reason}", .path.display())]
    BadCa { path: PathBuf, reason: String },
    #[error("cannot make the certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("no group {0:?} on this system (--group names the group that may read the key)")]
    NoGroup(String),
}

/// How long a CA made by `init` is valid.
const CA_DAYS: u32 = 3650;

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // A little in the past, so a peer whose clock is slightly behind accepts it.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

fn write(path: &Path, contents: &str, mode: u32, force: bool) -> Result<(), PkiError> {
    let mut options = OpenOptions::new();
    options.write(true).mode(mode);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::Exists(path.to_owned())
        } else {
            PkiError::Write {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    // `mode` applies only to a new file: a replaced key gets it too.
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|()| file.write_all(contents.as_bytes()))
        .map_err(|source| PkiError::Write {
            path: path.to_owned(),
            source,
        })
}

/// Refuses to start when any of `paths` exists and `force` is not given,
/// so a failed run writes nothing rather than half a set.
fn check_free(paths: &[&Path], force: bool) -> Result<(), PkiError> {
    match paths.iter().find(|p| !force && p.exists()) {
        Some(path) => Err(PkiError::Exists(path.to_path_buf())),
        None => Ok(()),
    }
}

fn write_pair(dir: &Path, stem: &str, cert: &str, key: &str, force: bool) -> Result<(), PkiError> {
    write(&dir.join(format!("{stem}.key")), key, 0o600, force)?;
    write(&dir.join(format!("{stem}.pem")), cert, 0o644, force)
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Write {
        path: dir.to_owned(),
        source,
    })
}

/// The files `init` writes, for its report.
#[derive(Debug)]
pub struct Made {
    pub files: Vec<PathBuf>,
}

/// `tls init`: a CA and a server certificate signed by it, valid for `dns`
/// names and `ips`, and always for localhost, 127.0.0.1 and ::1.
///
/// # Errors
/// Existing files without `force`, unwritable DIR, invalid names.
pub fn init(
    dir: &Path,
    dns: &[String],
    ips: &[IpAddr],
    days: u32,
    force: bool,
) -> Result<Made, PkiError> {
    let stems = ["ca", "server"];
    let files: Vec<PathBuf> = stems
        .iter()
        .flat_map(|s| [dir.join(format!("{s}.pem")), dir.join(format!("{s}.key"))])
        .collect();
    check_free(
        &files.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
        force,
    )?;
    create_dir(dir)?;

    let ca_key = KeyPair::generate()?;
    let mut ca = ca_params();
    validity(&mut ca, CA_DAYS);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, &ca_key);

    // Loopback names always: a local probe (`contactd health --tls`) can
    // then verify the server without --tls-server-name.
    let mut dns: Vec<String> = dns.to_vec();
    if !dns.iter().any(|d| d == "localhost") {
        dns.push("localhost".to_owned());
    }
    let mut ips: Vec<IpAddr> = ips.to_vec();
    for ip in [
        IpAddr::from([127, 0, 0, 1]),
        std::net::Ipv6Addr::LOCALHOST.into(),
    ] {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let mut sans = Vec::new();
    for name in &dns {
        sans.push(SanType::DnsName(name.clone().try_into().map_err(
            |e: rcgen::Error| PkiError::BadName(name.clone(), e.to_string()),
        )?));
    }
    sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    let mut server = CertificateParams::default();
    let common = dns
        .first()
        .cloned()
        .or_else(|| ips.first().map(ToString::to_string))
        .unwrap_or_default();
    server.distinguished_name.push(DnType::CommonName, common);
    server.subject_alt_names = sans;
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.use_authority_key_identifier_extension = true;
    validity(&mut server, days);
    let server_key = KeyPair::generate()?;
    let server_cert = server.signed_by(&server_key, &issuer)?;

    write_pair(dir, "ca", &ca_cert.pem(), &ca_key.serialize_pem(), force)?;
    write_pair(
        dir,
        "server",
        &server_cert.pem(),
        &server_key.serialize_pem(),
        force,
    )?;
    Ok(Made { files })
}

/// The CA `init` makes. `issue` signs with these same parameters, so the
/// issuer of what it makes is byte for byte the subject of `ca.pem`.
fn ca_params() -> CertificateParams {
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "contactd fleet CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca
}

/// The CA in `dir` that `init` made, to sign with: the key in `ca.key`,
/// checked to be the key of the certificate in `ca.pem`, whose subject must
/// be the one `init` writes (what is issued names it as its issuer).
///
/// # Errors
/// A missing or unreadable file, a key of another certificate, a CA that
/// `init` did not make.
pub fn ca_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let read = |path: PathBuf| {
        std::fs::read_to_string(&path).map_err(|source| PkiError::Read { path, source })
    };
    let ca_key = KeyPair::from_pem(&read(dir.join("ca.key"))?)?;
    let path = dir.join("ca.pem");
    let ca_pem = read(path.clone())?;
    let bad = |reason: &str| PkiError::BadCa {
        path: path.clone(),
        reason: reason.to_owned(),
    };
    let der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| bad(&format!("no PEM certificate ({e})")))?;
    let cert = super::x509::parse(&der).ok_or_else(|| bad("not an X.509 certificate"))?;
    if cert.public_key != ca_key.subject_public_key_info().as_slice() {
        return Err(bad("ca.key is not the key of this certificate"));
    }
    // What `init` would have written as the subject: made the same way.
    let ours = ca_params().self_signed(&ca_key)?;
    let ours = super::x509::parse(ours.der()).ok_or_else(|| bad("unreadable"))?;
    if cert.subject != ours.subject {
        return Err(bad(
            "not the CA `contactd tls init` makes: issue certificates with that CA's own tools",
        ));
    }
    Ok(Issuer::new(ca_params(), ca_key))
}

/// Longest identity name (an agent name's bound).
const MAX_NAME: usize = 253;

/// `tls issue`: a client certificate for `name` (its SAN and CN), signed by
/// the CA in `dir`, written as `dir/NAME.pem` and `dir/NAME.key`.
///
/// # Errors
/// A missing CA, an existing pair without `force`, an invalid name.
///
/// With `group`, the key is made readable by that group (mode 0640, its
/// group set): the packaged agent runs as user `contactd`, and a key only
/// root can read would stop it at its first connection.
pub fn issue(
    dir: &Path,
    name: &str,
    days: u32,
    force: bool,
    group: Option<&str>,
) -> Result<Made, PkiError> {
    let valid = (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && !name.starts_with('.');
    if !valid {
        return Err(PkiError::BadName(
            name.to_owned(),
            format!(
                "expected 1 to {MAX_NAME} letters, digits, '-', '_' or '.' (it names the files and the agent)"
            ),
        ));
    }
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    check_free(&[&cert_path, &key_path], force)?;
    // Before anything is written: a misspelt group writes nothing.
    let gid = match group {
        Some(group) => Some(
            nix::unistd::Group::from_name(group)
                .ok()
                .flatten()
                .ok_or_else(|| PkiError::NoGroup(group.to_owned()))?
                .gid
                .as_raw(),
        ),
        None => None,
    };
    let issuer = ca_issuer(dir)?;

    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names =
        vec![SanType::DnsName(name.to_owned().try_into().map_err(
            |e: rcgen::Error| PkiError::BadName(name.to_owned(), e.to_string()),
        )?)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write_pair(dir, name, &cert.pem(), &key.serialize_pem(), force)?;
    if let Some(gid) = gid {
        // Group first, then the mode: the key is never readable by a group
        // it was not meant for.
        use std::os::unix::fs::PermissionsExt;
        std::os::unix::fs::chown(&key_path, None, Some(gid))
            .and_then(|()| {
                std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o640))
            })
            .map_err(|source| PkiError::Write {
                path: key_path.clone(),
                source,
            })?;
    }
    Ok(Made {
        files: vec![cert_path, key_path],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_under_the_ca_init_made_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &["srv.example".to_owned()], &[], 30, false).unwrap();
        issue(dir.path(), "web1", 30, false, None).unwrap();
        let read = |name: &str| {
            let pem = std::fs::read(dir.path().join(name)).unwrap();
            CertificateDer::from_pem_slice(&pem).unwrap()
        };
        let (ca, web1) = (read("ca.pem"), read("web1.pem"));
        let ca = crate::tls::x509::parse(&ca).unwrap();
        assert_eq!(crate::tls::identity(&web1).as_deref(), Some("web1"));
        // The issuer named in web1.pem is, byte for byte, the CA's subject.
        assert!(web1.windows(ca.subject.len()).any(|w| w == ca.subject));
        assert_eq!(ca.common_name(), Some("contactd fleet CA"));

        // A ca.key that is not the key of ca.pem.
        let other = KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("ca.key"), other.serialize_pem()).unwrap();
        let err = issue(dir.path(), "web2", 30, false, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ca.key is not the key"), "{err}");

        // A CA of someone else's making, with its own key.
        let mut foreign = CertificateParams::default();
        foreign
            .distinguished_name
            .push(DnType::CommonName, "corp CA");
        foreign.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = foreign.self_signed(&other).unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        let err = issue(dir.path(), "web2", 30, false, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not the CA `contactd tls init` makes"),
            "{err}"
        );

        std::fs::write(dir.path().join("ca.pem"), "garbage").unwrap();
        let err = issue(dir.path(), "web2", 30, false, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
        assert!(!dir.path().join("web2.pem").exists());
    }
}

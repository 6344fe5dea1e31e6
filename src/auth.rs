//! Tokens on Contact calls, sent as `authorization: Bearer <token>` (an
//! agent's `agent.token_file`):
//!
//! - a shared secret (`server.auth_token_file`): every call must carry it,
//!   and it proves nothing about who calls;
//! - named tokens (`server.tokens_file`, made by `contactd token create`):
//!   each gives its holder a name and a role. The file keeps only each
//!   token's SHA-256 digest, never the token.
//!
//! Health, reflection and the admin socket (file permissions) need none.

use std::{
    collections::HashMap,
    fmt,
    io::Write,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
};

use subtle::ConstantTimeEq;
use tonic::Status;

/// The header carrying the token.
pub const HEADER: &str = "authorization";

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read token file {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {} is empty", .0.display())]
    Empty(PathBuf),
    #[error("token file {} holds characters a header cannot carry: use visible ASCII", .0.display())]
    NotVisible(PathBuf),
    #[error("{}:{line}: {message}", .path.display())]
    Entry {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("cannot write token file {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads a token: the file's content without surrounding whitespace.
///
/// # Errors
/// The file cannot be read, is empty, or holds other than visible ASCII.
pub fn read_token(path: &Path) -> Result<String, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenError::Empty(path.to_owned()));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::NotVisible(path.to_owned()));
    }
    Ok(token.to_owned())
}

/// The header value for `token`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// What a named token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// getTask, sendStatus, tellResult, as itself.
    Agent,
    /// remoteCMD.
    Operator,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Agent => "agent",
            Role::Operator => "operator",
        })
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Role, String> {
        match text {
            "agent" => Ok(Role::Agent),
            "operator" => Ok(Role::Operator),
            other => Err(format!(
                "unknown role {other:?}: expected \"agent\" or \"operator\""
            )),
        }
    }
}

/// Who holds a named token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub name: Arc<str>,
    pub role: Role,
}

pub(crate) fn digest(token: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Longest name a token may carry (an agent name's bound).
pub const MAX_NAME: usize = 253;

/// Whether `name` can be an identity: 1 to 253 visible ASCII characters.
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_graphic())
}

/// The named tokens of `server.tokens_file`: one line per holder,
/// `NAME ROLE sha256:HEX`, `#` comments and blank lines ignored.
#[derive(Debug, Default, Clone)]
pub struct Tokens {
    /// By the digest of the token. Looking a digest up leaks, through
    /// timing, nothing useful: an attacker cannot choose a token whose
    /// digest approaches a stored one. The match is still confirmed in
    /// constant time.
    by_digest: HashMap<[u8; 32], Holder>,
}

impl Tokens {
    /// Reads a tokens file.
    ///
    /// # Errors
    /// An unreadable file, or a line that is not `NAME ROLE sha256:HEX`
    /// (each problem names its line), or a name given twice.
    pub fn load(path: &Path) -> Result<Tokens, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut tokens = Tokens::default();
        let mut names = std::collections::HashSet::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let entry = |message: String| TokenError::Entry {
                path: path.to_owned(),
                line: i + 1,
                message,
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, role, hash] = fields[..] else {
                return Err(entry(
                    "expected `NAME ROLE sha256:HEX` (use `contactd token create`)".into(),
                ));
            };
            if !valid_name(name) {
                return Err(entry(format!(
                    "invalid name: expected 1 to {MAX_NAME} visible ASCII characters"
                )));
            }
            let role: Role = role.parse().map_err(entry)?;
            let digest = hash
                .strip_prefix("sha256:")
                .and_then(unhex)
                .ok_or_else(|| entry("expected sha256: and 64 hex digits".into()))?;
            if !names.insert(name.to_owned()) {
                return Err(entry(format!("{name} is listed twice")));
            }
            tokens.by_digest.insert(
                digest,
                Holder {
                    name: Arc::from(name),
                    role,
                },
            );
        }
        Ok(tokens)
    }

    /// The holder of `token`, if it is one of these.
    pub fn holder(&self, token: &[u8]) -> Option<&Holder> {
        let wanted = digest(token);
        let (stored, holder) = self.by_digest.get_key_value(&wanted)?;
        bool::from(stored.ct_eq(&wanted)).then_some(holder)
    }

    /// The holder of the token whose SHA-256 is `digest` (what a web
    /// console session keeps of the token it logged in with, to ask again).
    pub fn holder_by_digest(&self, digest: &[u8; 32]) -> Option<&Holder> {
        self.by_digest.get(digest)
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

/// `contactd token create`: makes a random token for `name`, appends its
/// digest to `path` (created mode 0600), and returns the token, which is
/// shown once and stored nowhere.
///
/// # Errors
/// An invalid name, a name already in the file (without `force`, which
/// replaces its line), or a file that cannot be read or written.
pub fn create_token(
    path: &Path,
    name: &str,
    role: Role,
    force: bool,
) -> Result<String, TokenError> {
    use std::os::unix::fs::OpenOptionsExt;
    let entry = |line: usize, message: String| TokenError::Entry {
        path: path.to_owned(),
        line,
        message,
    };
    if !valid_name(name) {
        return Err(entry(
            0,
            format!("invalid name {name:?}: expected 1 to {MAX_NAME} visible ASCII characters"),
        ));
    }
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(TokenError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut kept = String::new();
    for (i, line) in existing.lines().enumerate() {
        if line.split_whitespace().next() == Some(name) {
            if !force {
                return Err(entry(
                    i + 1,
                    format!("{name} already has a token: pass --force to replace it"),
                ));
            }
            continue;
        }
        kept.push_str(line);
        kept.push('\n');
    }
    let token = format!("ctd_{}", hex(&crate::secret_random::<32>()));
    kept.push_str(&format!(
        "{name} {role} sha256:{}\n",
        hex(&digest(token.as_bytes()))
    ));
    // Written beside the file and renamed over it, so a reader (a server
    // reloading) never sees half a file.
    let tmp = path.with_extension("tmp");
    let write = |source| TokenError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write)?;
    file.write_all(kept.as_bytes()).map_err(write)?;
    file.sync_all().map_err(write)?;
    std::fs::rename(&tmp, path).map_err(write)?;
    Ok(token)
}

/// What a call's `authorization` header proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// No header.
    None,
    /// The shared secret.
    Shared,
    /// A named token.
    Named(Holder),
}

/// The tokens a server accepts; replaced whole on reload.
#[derive(Debug, Default)]
pub struct Verifier {
    /// The whole expected header value of the shared secret.
    expected: Option<Vec<u8>>,
    /// Named tokens.
    tokens: Option<Tokens>,
}

impl Verifier {
    /// A verifier requiring `token`, or none if `None`.
    pub fn new(token: Option<&str>) -> Verifier {
        Verifier {
            expected: token.map(|t| bearer(t).into_bytes()),
            tokens: None,
        }
    }

    /// A verifier for a shared secret and named tokens, read from their files.
    ///
    /// # Errors
    /// As [`read_token`] and [`Tokens::load`].
    pub fn load(shared: Option<&Path>, tokens: Option<&Path>) -> Result<Verifier, TokenError> {
        let mut verifier = Verifier::from_file(shared)?;
        verifier.tokens = tokens.map(Tokens::load).transpose()?;
        Ok(verifier)
    }

    /// Whether a shared secret is required on every call.
    pub fn requires_shared(&self) -> bool {
        self.expected.is_some()
    }

    /// Whether named tokens are configured.
    pub fn has_tokens(&self) -> bool {
        self.tokens.is_some()
    }

    /// How many named tokens there are.
    pub fn token_count(&self) -> usize {
        self.tokens.as_ref().map_or(0, Tokens::len)
    }

    /// The names that hold a token here and none in `new`: the identities
    /// a reload to `new` revokes. (With no tokens file in `new`, none:
    /// turning named tokens off is not a revocation of each.)
    pub fn revoked_in(&self, new: &Verifier) -> Vec<Arc<str>> {
        let (Some(old), Some(new)) = (&self.tokens, &new.tokens) else {
            return Vec::new();
        };
        let kept: std::collections::HashSet<&str> =
            new.by_digest.values().map(|h| &*h.name).collect();
        let mut revoked: Vec<Arc<str>> = old
            .by_digest
            .values()
            .filter(|h| !kept.contains(&*h.name))
            .map(|h| Arc::clone(&h.name))
            .collect();
        revoked.sort();
        revoked.dedup();
        revoked
    }

    /// The holder of the named token whose SHA-256 is `digest`, if it is
    /// still one of these.
    pub fn holder_by_digest(&self, digest: &[u8; 32]) -> Option<&Holder> {
        self.tokens.as_ref()?.holder_by_digest(digest)
    }

    /// What the call's `authorization` header proves.
    ///
    /// # Errors
    /// UNAUTHENTICATED for a header that is neither the shared secret nor a
    /// named token (its value is never echoed or logged).
    pub fn credential(&self, header: Option<&[u8]>) -> Result<Credential, Status> {
        let Some(given) = header else {
            return Ok(Credential::None);
        };
        if let Some(expected) = &self.expected
            && bool::from(given.ct_eq(expected))
        {
            return Ok(Credential::Shared);
        }
        let holder = self.tokens.as_ref().and_then(|tokens| {
            let token = given.strip_prefix(b"Bearer ")?;
            tokens.holder(token)
        });
        match holder {
            Some(holder) => Ok(Credential::Named(holder.clone())),
            None => Err(Status::unauthenticated(
                "wrong token: the authorization header holds no token this server knows \
                 (server.auth_token_file / server.tokens_file; agents set agent.token_file)",
            )),
        }
    }

    /// A verifier for the token in `path`, or one letting every call in.
    ///
    /// # Errors
    /// As [`read_token`].
    pub fn from_file(path: Option<&Path>) -> Result<Verifier, TokenError> {
        let token = path.map(read_token).transpose()?;
        Ok(Verifier::new(token.as_deref()))
    }
}

/// Who is calling, as established by the server's gate; in every Contact request's
/// extensions.
#[derive(Debug, Clone)]
pub struct Principal {
    pub who: Who,
    /// May receive tasks, report status and ack (as itself).
    pub agent: bool,
    /// May run remote commands.
    pub operator: bool,
    /// The labels it says it has (its `x-contactd-labels` header, checked
    /// for form only: the server's pins are applied over them).
    pub labels: Option<std::sync::Arc<crate::labels::Labels>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    /// Proved by a client certificate or a named token.
    Verified(Arc<str>),
    /// Taken from the header, with no identity mechanism configured.
    Label(Arc<str>),
    /// Nobody in particular.
    Anonymous,
}

impl Who {
    /// The name acks and delivery state are kept under, if any.
    pub fn name(&self) -> Option<&Arc<str>> {
        match self {
            Who::Verified(name) | Who::Label(name) => Some(name),
            Who::Anonymous => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_secret_and_named_tokens_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let web1 = create_token(&path, "web1", Role::Agent, false).unwrap();
        let ops = create_token(&path, "ops", Role::Operator, false).unwrap();
        assert!(create_token(&path, "web1", Role::Agent, false).is_err());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&web1) && !text.contains(&ops), "{text}");
        let mut verifier = Verifier::new(Some("s3cret"));
        verifier.tokens = Some(Tokens::load(&path).unwrap());
        let check = |v: &str| verifier.credential(Some(v.as_bytes()));
        assert_eq!(check("Bearer s3cret").unwrap(), Credential::Shared);
        assert_eq!(
            check(&bearer(&web1)).unwrap(),
            Credential::Named(Holder {
                name: "web1".into(),
                role: Role::Agent
            })
        );
        assert_eq!(
            check(&bearer(&ops)).unwrap(),
            Credential::Named(Holder {
                name: "ops".into(),
                role: Role::Operator
            })
        );
        for wrong in ["Bearer s3cre", "s3cret", &web1, "Bearer ctd_00"] {
            let err = check(wrong).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{wrong:?}");
        }
        assert_eq!(verifier.credential(None).unwrap(), Credential::None);
        // Replacing a token revokes the old one.
        let again = create_token(&path, "web1", Role::Agent, true).unwrap();
        let tokens = Tokens::load(&path).unwrap();
        assert!(tokens.holder(web1.as_bytes()).is_none());
        assert!(tokens.holder(again.as_bytes()).is_some());
        assert_eq!(tokens.len(), 2);
    }

    #[test]
    fn bad_token_lines_name_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# comment\n\nweb1 agent sha256:00\n").unwrap();
        let err = Tokens::load(&path).unwrap_err().to_string();
        assert!(
            err.ends_with(":3: expected sha256: and 64 hex digits"),
            "{err}"
        );
        std::fs::write(&path, "web1 root sha256:00\n").unwrap();
        assert!(
            Tokens::load(&path)
                .unwrap_err()
                .to_string()
                .contains("unknown role")
        );
    }

    #[test]
    fn token_files_are_trimmed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  abc123\n").unwrap();
        assert_eq!(read_token(&path).unwrap(), "abc123");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(read_token(&path), Err(TokenError::Empty(_))));
        std::fs::write(&path, "a b").unwrap();
        assert!(matches!(read_token(&path), Err(TokenError::NotVisible(_))));
        assert!(matches!(
            read_token(&dir.path().join("none")),
            Err(TokenError::Read { .. })
        ));
    }
}

//! Shared-secret tokens: a server with `server.auth_token_file` requires
//! `authorization: Bearer <token>` on every Contact call; an agent with
//! `agent.token_file` sends it. Health, reflection and the admin socket
//! (protected by file permissions) need none.

use std::path::{Path, PathBuf};

use subtle::ConstantTimeEq;
use tonic::{Status, metadata::MetadataMap};

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

/// Checks calls against the expected token, if any.
#[derive(Debug, Default)]
pub struct Verifier {
    /// The whole expected header value; `None`: every call is let in.
    expected: Option<Vec<u8>>,
}

impl Verifier {
    /// A verifier requiring `token`, or none if `None`.
    pub fn new(token: Option<&str>) -> Verifier {
        Verifier {
            expected: token.map(|t| bearer(t).into_bytes()),
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

    /// Lets a call in, or refuses it with UNAUTHENTICATED.
    ///
    /// # Errors
    /// A missing or wrong token.
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(expected) = &self.expected else {
            return Ok(());
        };
        let given = metadata
            .get(HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        // Constant time, so the comparison does not leak how much matched.
        if bool::from(given.ct_eq(expected)) {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "missing or wrong token: this server requires `authorization: Bearer <token>` \
                 (server.auth_token_file; agents set agent.token_file)",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: Option<&str>) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        if let Some(value) = value {
            metadata.insert(HEADER, value.parse().unwrap());
        }
        metadata
    }

    #[test]
    fn a_verifier_without_a_token_lets_everyone_in() {
        assert!(Verifier::new(None).check(&with(None)).is_ok());
    }

    #[test]
    fn only_the_right_bearer_token_passes() {
        let verifier = Verifier::new(Some("s3cret"));
        assert!(verifier.check(&with(Some("Bearer s3cret"))).is_ok());
        for wrong in [
            None,
            Some("Bearer s3cre"),
            Some("s3cret"),
            Some("Bearer s3cret2"),
        ] {
            let err = verifier.check(&with(wrong)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{wrong:?}");
        }
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

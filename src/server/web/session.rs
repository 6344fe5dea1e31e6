//! The console's sessions: who logged in, until when, and the token every
//! action must carry (CSRF).
//!
//! A session id is 32 random bytes, handed out only by a successful login
//! and never taken from the browser before it: a login always makes a new
//! id, so an id planted in a browser beforehand (session fixation) is never
//! promoted to a logged-in one. The server keeps only the SHA-256 of each id
//! (a copy of the table would not log anyone in), at most
//! `web.max_sessions` of them: a login beyond that ends the oldest session,
//! so logging in cannot grow memory and an operator is never locked out by
//! stale sessions. Every action also carries the session's CSRF token, a
//! second random value the page embeds and a cross-site form cannot read.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use subtle::ConstantTimeEq;

/// The cookie holding the session id.
pub(super) const COOKIE: &str = "contactd_session";

/// How an operator logged in: asked again at every request, so that a
/// token revoked or demoted, or a certificate's name taken out of
/// `remote_cmd.callers`, by a reload ends the session at its next request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Proof {
    /// A named token, by its SHA-256 (as the tokens file keeps it).
    Token([u8; 32]),
    /// A verified client certificate naming the operator, by the SHA-256
    /// of its DER: the session is honoured only on connections presenting it.
    Certificate([u8; 32]),
}

/// One logged-in operator.
#[derive(Debug, Clone)]
pub(super) struct Session {
    /// Who logged in (a token's or a certificate's name).
    pub(super) name: Arc<str>,
    /// How.
    pub(super) proof: Proof,
    /// The value every action's form must carry.
    pub(super) csrf: String,
    /// When the session was made, and when it ends.
    made: Instant,
    ends: Instant,
}

impl Proof {
    /// For the log: "token" or "certificate".
    pub(super) fn by(self) -> &'static str {
        match self {
            Proof::Token(_) => "token",
            Proof::Certificate(_) => "certificate",
        }
    }
}

impl Session {
    /// How the operator logged in, for the action log.
    pub(super) fn by(&self) -> &'static str {
        self.proof.by()
    }

    /// Whether `given` is this session's CSRF token (constant time).
    pub(super) fn csrf_matches(&self, given: &str) -> bool {
        given.len() == self.csrf.len() && bool::from(given.as_bytes().ct_eq(self.csrf.as_bytes()))
    }
}

/// The sessions in force, by the SHA-256 of their ids; a clone shares them
/// (an event stream holds one, to end with its session).
#[derive(Debug, Default, Clone)]
pub(super) struct Sessions {
    map: Arc<Mutex<HashMap<[u8; 32], Session>>>,
}

impl Sessions {
    /// A new session for `name`; returns the id for the cookie. Ends the
    /// oldest sessions beyond `max`, and every expired one.
    pub(super) fn login(&self, name: Arc<str>, proof: Proof, ttl: Duration, max: usize) -> String {
        let id = crate::auth::hex(&crate::secret_random::<32>());
        let now = Instant::now();
        let session = Session {
            name,
            proof,
            csrf: crate::auth::hex(&crate::secret_random::<32>()),
            made: now,
            ends: now + ttl,
        };
        let mut map = self.map.lock();
        map.retain(|_, s| s.ends > now);
        while map.len() >= max.max(1) {
            let Some(oldest) = map.iter().min_by_key(|(_, s)| s.made).map(|(k, _)| *k) else {
                break;
            };
            map.remove(&oldest);
        }
        map.insert(crate::auth::digest(id.as_bytes()), session);
        id
    }

    /// The session a cookie's id names, if it is in force.
    pub(super) fn get(&self, id: &str) -> Option<Session> {
        let key = crate::auth::digest(id.as_bytes());
        let mut map = self.map.lock();
        match map.get(&key) {
            Some(s) if s.ends > Instant::now() => Some(s.clone()),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends the session `id` names.
    pub(super) fn logout(&self, id: &str) {
        self.map.lock().remove(&crate::auth::digest(id.as_bytes()));
    }

    /// Sessions in force (expired ones not yet swept included).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().len()
    }
}

/// The session id in a `Cookie` header, if any.
pub(super) fn cookie_id(header: Option<&str>) -> Option<&str> {
    header?.split(';').find_map(|part| {
        let (name, value) = part.trim().split_once('=')?;
        (name == COOKIE && !value.is_empty() && value.len() <= 128).then_some(value)
    })
}

/// The `Set-Cookie` value for a new session: script cannot read it
/// (HttpOnly), no other site's page sends it (SameSite=Strict), and over
/// TLS it never travels in clear (Secure).
pub(super) fn set_cookie(id: &str, ttl: Duration, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        ttl.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub(super) fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_makes_a_new_id_and_the_oldest_make_room() {
        let sessions = Sessions::default();
        let ttl = Duration::from_secs(60);
        let first = sessions.login("a".into(), Proof::Certificate([0; 32]), ttl, 2);
        let second = sessions.login("a".into(), Proof::Certificate([0; 32]), ttl, 2);
        assert_ne!(first, second, "every login makes a new id");
        let third = sessions.login("b".into(), Proof::Certificate([0; 32]), ttl, 2);
        assert_eq!(sessions.len(), 2);
        assert!(sessions.get(&first).is_none(), "the oldest ended");
        assert_eq!(&*sessions.get(&third).unwrap().name, "b");
        let csrf = sessions.get(&second).unwrap().csrf;
        assert!(sessions.get(&second).unwrap().csrf_matches(&csrf));
        assert!(!sessions.get(&second).unwrap().csrf_matches("x"));
        sessions.logout(&second);
        assert!(sessions.get(&second).is_none());
        assert!(sessions.get("not-an-id").is_none());
    }

    #[test]
    fn expired_sessions_are_refused() {
        let sessions = Sessions::default();
        let id = sessions.login("a".into(), Proof::Certificate([0; 32]), Duration::ZERO, 4);
        assert!(sessions.get(&id).is_none());
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let header = Some("theme=dark; contactd_session=abc123; other=1");
        assert_eq!(cookie_id(header), Some("abc123"));
        assert_eq!(cookie_id(Some("contactd_session=")), None);
        assert_eq!(cookie_id(None), None);
        let set = set_cookie("abc", Duration::from_secs(5), true);
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"));
        assert!(set.ends_with("; Secure"));
        assert!(!set_cookie("abc", Duration::from_secs(5), false).contains("Secure"));
    }
}

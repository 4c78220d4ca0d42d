//! Who may change things: the bearer token (API), and login sessions with
//! CSRF tokens (pages).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use subtle::ConstantTimeEq;

use super::Ui;

/// The session cookie's name.
pub(super) const COOKIE: &str = "pgpubsub_session";
/// How long a login lasts.
pub(super) const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most (the oldest goes first): a flood of logins with
/// the right token cannot grow memory without bound.
const MAX_SESSIONS: usize = 1000;

/// What the server says to a mutation without a configured token.
pub(super) const READ_ONLY: &str = "read-only dashboard: it was started without an admin token, \
     so nothing can be changed from it; start it with --admin-token or PGPUBSUB_ADMIN_TOKEN \
     (UiOptions::admin_token) to allow retrying and deleting dead jobs";

/// A logged-in browser.
struct Session {
    csrf: String,
    expires: Instant,
}

/// Live sessions by id.
#[derive(Default)]
pub(super) struct Sessions {
    by_id: HashMap<String, Session>,
}

/// A fresh random token: 244 random bits from the OS, as hex.
fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Whether `a` equals `b`, in time independent of where they differ.
pub(super) fn same(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

impl Sessions {
    /// Opens a session; its id and CSRF token.
    pub(super) fn open(&mut self) -> (String, String) {
        let now = Instant::now();
        self.by_id.retain(|_, s| s.expires > now);
        if self.by_id.len() >= MAX_SESSIONS {
            if let Some(oldest) = self
                .by_id
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(id, _)| id.clone())
            {
                self.by_id.remove(&oldest);
            }
        }
        let id = random_token();
        let csrf = random_token();
        self.by_id.insert(
            id.clone(),
            Session {
                csrf: csrf.clone(),
                expires: now + SESSION_TTL,
            },
        );
        (id, csrf)
    }

    /// The CSRF token of live session `id`.
    fn csrf(&self, id: &str) -> Option<&str> {
        self.by_id
            .get(id)
            .filter(|s| s.expires > Instant::now())
            .map(|s| s.csrf.as_str())
    }

    /// Ends session `id`.
    pub(super) fn close(&mut self, id: &str) {
        self.by_id.remove(id);
    }
}

/// The session id in the request's cookies.
pub(super) fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// Why a mutation is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// No token configured: read-only.
    ReadOnly,
    /// No (valid) credentials.
    Unauthorized,
    /// A session without the form's CSRF token.
    BadCsrf,
}

impl Ui {
    /// Checks an API mutation's `Authorization: Bearer` header.
    pub(super) fn check_bearer(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let Some(token) = &self.opts.admin_token else {
            return Err(Refusal::ReadOnly);
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match given {
            Some(g) if same(g, token) => Ok(()),
            _ => Err(Refusal::Unauthorized),
        }
    }

    /// Checks a login form's token; a new session (id, CSRF) if right.
    pub(super) fn login(&self, given: &str) -> Result<(String, String), Refusal> {
        let Some(token) = &self.opts.admin_token else {
            return Err(Refusal::ReadOnly);
        };
        if !same(given, token) {
            return Err(Refusal::Unauthorized);
        }
        Ok(self.lock_sessions().open())
    }

    /// The CSRF token of the request's live session, if logged in (and a
    /// token is configured).
    pub(super) fn session_csrf(&self, headers: &HeaderMap) -> Option<String> {
        self.opts.admin_token.as_ref()?;
        let id = session_id(headers)?;
        self.lock_sessions().csrf(&id).map(str::to_owned)
    }

    /// Checks a page mutation: a live session and its CSRF token.
    pub(super) fn check_form(&self, headers: &HeaderMap, csrf: &str) -> Result<(), Refusal> {
        if self.opts.admin_token.is_none() {
            return Err(Refusal::ReadOnly);
        }
        let expected = self.session_csrf(headers).ok_or(Refusal::Unauthorized)?;
        if same(csrf, &expected) {
            Ok(())
        } else {
            Err(Refusal::BadCsrf)
        }
    }

    pub(super) fn lock_sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The `Set-Cookie` value of a new session.
pub(super) fn session_cookie(id: &str) -> String {
    format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        SESSION_TTL.as_secs()
    )
}

/// The `Set-Cookie` value that ends a session in the browser.
pub(super) fn cleared_cookie() -> String {
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn finds_the_session_cookie_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; pgpubsub_session=abc; b=2"),
        );
        assert_eq!(session_id(&h).as_deref(), Some("abc"));
    }

    #[test]
    fn sessions_are_bounded_and_random() {
        let mut s = Sessions::default();
        let (a, csrf) = s.open();
        assert_ne!(a, csrf);
        assert_eq!(s.csrf(&a), Some(csrf.as_str()));
        for _ in 0..MAX_SESSIONS + 5 {
            s.open();
        }
        assert!(s.by_id.len() <= MAX_SESSIONS);
        s.close(&a);
        assert_eq!(s.csrf(&a), None);
    }

    #[test]
    fn comparison() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
    }
}

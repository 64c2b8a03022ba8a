//! Who may call the API. `/v1` needs a bearer token from the token file
//! (one token per line, so tokens can rotate; re-read when the file
//! changes; compared in constant time). The legacy `POST /snapshot` cannot
//! send credentials (soda-proxy is fixed), so it is accepted from the
//! configured networks only, or must carry the token, or is switched off.
//! `/healthz`, `/readyz`, `/metrics` and `/openapi.json` stay open: they
//! carry no secrets. A refused token is counted, never logged.
//! The web page's session cookie (see [`super::page`]) also admits a `/v1`
//! request, when no `Authorization` header is sent; a cookie-authenticated
//! request that may change something (any method but GET and HEAD) must
//! carry the session's CSRF token in `X-CSRF-Token`.

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::{ApiError, AppState};
use crate::config::{Cidr, LegacyMode};

/// The token file, re-read when its modification time changes.
struct TokenFile {
    path: PathBuf,
    cache: Mutex<(Option<SystemTime>, Vec<String>)>,
}

impl TokenFile {
    fn tokens(&self) -> Vec<String> {
        let mtime = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0 != mtime || mtime.is_none() {
            let text = std::fs::read_to_string(&self.path).unwrap_or_default();
            let tokens: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from)
                .collect();
            if tokens.is_empty() {
                tracing::error!(file = %self.path.display(), "the token file is missing or empty: every /v1 request is refused");
            }
            *cache = (mtime, tokens);
        }
        cache.1.clone()
    }
}

/// Compare without leaking, through timing, how much of a guess was right.
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

pub struct Auth {
    tokens: TokenFile,
    legacy: LegacyMode,
    legacy_networks: Vec<Cidr>,
    pub refused_tokens: AtomicU64,
    pub refused_legacy: AtomicU64,
    /// The web page's login sessions.
    pub(super) sessions: Sessions,
}

impl Auth {
    pub fn new(token_file: PathBuf, legacy: LegacyMode, legacy_networks: Vec<Cidr>) -> Auth {
        Auth {
            tokens: TokenFile { path: token_file, cache: Mutex::default() },
            legacy,
            legacy_networks,
            refused_tokens: AtomicU64::new(0),
            refused_legacy: AtomicU64::new(0),
            sessions: Sessions::default(),
        }
    }

    /// Create the token file with one random token (mode 0600) if it does
    /// not exist, so the secure default costs a new user nothing: the CLI
    /// on the same node reads it from there.
    pub fn ensure_token_file(path: &Path) -> std::io::Result<bool> {
        if path.exists() {
            return Ok(false);
        }
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        writeln!(f, "{}", crate::ids::random_hex(32))?;
        f.sync_all()?;
        Ok(true)
    }

    fn token_ok(&self, header: Option<&str>) -> bool {
        let Some(presented) = header.and_then(|h| h.strip_prefix("Bearer ")).map(str::trim) else {
            return false;
        };
        self.is_token(presented)
    }

    /// Whether `presented` is one of the token file's tokens (now).
    pub(super) fn is_token(&self, presented: &str) -> bool {
        if presented.is_empty() {
            return false;
        }
        // Check every token (no early exit), so timing says nothing about which matched.
        self.tokens.tokens().iter().fold(false, |ok, t| ok | constant_time_eq(t.as_bytes(), presented.as_bytes()))
    }
}

fn unauthorized(msg: &str) -> Response {
    let mut r = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", msg).into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("static header"));
    r
}

pub async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let auth = &state.auth;
    let path = req.uri().path();
    let bearer = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if path.starts_with("/v1/") || path == "/v1" {
        // The page's cookie counts only when no Authorization header is
        // sent: a wrong bearer token is refused as before.
        if bearer.is_none() {
            if let Some(session) = auth.sessions.from_cookie(req.headers(), auth) {
                let safe = matches!(*req.method(), Method::GET | Method::HEAD);
                if !safe && !session.csrf_matches(req.headers()) {
                    auth.refused_tokens.fetch_add(1, Ordering::Relaxed);
                    return ApiError::new(
                        StatusCode::FORBIDDEN,
                        "csrf_token_missing",
                        "a request authenticated by the page's session cookie must carry the session's X-CSRF-Token header; API clients send Authorization: Bearer <token> instead",
                    )
                    .into_response();
                }
                return next.run(req).await;
            }
        }
        if !auth.token_ok(bearer) {
            auth.refused_tokens.fetch_add(1, Ordering::Relaxed);
            return unauthorized(
                "a valid bearer token is required: send Authorization: Bearer <token> (the agent's token file, by default <state-dir>/token)",
            );
        }
    } else if path == "/snapshot" {
        let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
        let allowed = match auth.legacy {
            LegacyMode::Off => false,
            LegacyMode::Token => auth.token_ok(bearer),
            // No peer address only happens in-process (tests): a local caller.
            LegacyMode::Network => {
                peer.is_none_or(|ip| auth.legacy_networks.iter().any(|n| n.contains(ip))) || auth.token_ok(bearer)
            }
        };
        if !allowed {
            auth.refused_legacy.fetch_add(1, Ordering::Relaxed);
            let why = match auth.legacy {
                LegacyMode::Off => "the legacy route is switched off on this agent (--legacy off)".to_string(),
                LegacyMode::Token => "the legacy route requires the bearer token on this agent (--legacy token)".to_string(),
                LegacyMode::Network => format!(
                    "{} may not call the legacy route: allow its network with --legacy-allow-cidr, or send the bearer token",
                    peer.map(|p| p.to_string()).unwrap_or_default()
                ),
            };
            return ApiError::new(StatusCode::FORBIDDEN, "legacy_caller_refused", why).into_response();
        }
    }
    next.run(req).await
}

// The web page's login sessions (see `super::page` for the login itself).

/// The session cookie's name.
pub const COOKIE: &str = "soda_session";
/// The header carrying the session's CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// A session ends this long after login, used or not.
pub(super) const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// More logins than this push out the oldest sessions: memory stays bounded
/// whatever a token holder does.
const MAX_SESSIONS: usize = 256;

#[derive(Clone)]
struct Session {
    csrf: String,
    /// The token it was made with: the session ends when the token file
    /// no longer holds it. Only in memory.
    token: String,
    expires: Instant,
}

/// The page's login sessions, by cookie value.
#[derive(Default)]
pub struct Sessions {
    by_id: Mutex<HashMap<String, Session>>,
}

/// A live session, as the auth guard sees it.
pub struct SessionRef {
    csrf: String,
}

impl SessionRef {
    /// The session's CSRF token, for the page that shows it once.
    pub fn csrf(&self) -> &str {
        &self.csrf
    }

    /// Whether the request carries this session's CSRF token.
    pub fn csrf_matches(&self, headers: &HeaderMap) -> bool {
        headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| constant_time_eq(v.trim().as_bytes(), self.csrf.as_bytes()))
    }
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session for `token` (already checked): (cookie value, CSRF token).
    pub(super) fn create(&self, token: &str) -> (String, String) {
        let id = crate::ids::random_hex(32);
        let csrf = crate::ids::random_hex(32);
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, s| s.expires > now);
        while map.len() >= MAX_SESSIONS {
            let oldest = map.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| k.clone());
            match oldest {
                Some(k) => map.remove(&k),
                None => break,
            };
        }
        map.insert(
            id.clone(),
            Session { csrf: csrf.clone(), token: token.to_string(), expires: now + SESSION_LIFETIME },
        );
        (id, csrf)
    }

    pub(super) fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// The session the request's cookie names, if it is live and its
    /// token still valid (an ended one is dropped).
    pub fn from_cookie(&self, headers: &HeaderMap, auth: &Auth) -> Option<SessionRef> {
        let id = cookie_value(headers)?;
        let session = self.lock().get(id).cloned()?;
        if session.expires <= Instant::now() || !auth.is_token(&session.token) {
            self.remove(id);
            return None;
        }
        Some(SessionRef { csrf: session.csrf })
    }
}

/// The session cookie's value in the request, if any.
pub(super) fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(!constant_time_eq(b"a", b""));
    }

    #[test]
    fn the_token_file_rotates_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        assert!(Auth::ensure_token_file(&path).unwrap());
        assert!(!Auth::ensure_token_file(&path).unwrap());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let auth = Auth::new(path.clone(), LegacyMode::Network, vec![]);
        let first = std::fs::read_to_string(&path).unwrap().trim().to_string();
        assert!(auth.token_ok(Some(&format!("Bearer {first}"))));
        assert!(!auth.token_ok(Some("Bearer wrong")));
        assert!(!auth.token_ok(None));
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, "# rotated\nnew-token\nsecond-token\n").unwrap();
        assert!(auth.token_ok(Some("Bearer new-token")));
        assert!(auth.token_ok(Some("Bearer second-token")));
        assert!(!auth.token_ok(Some(&format!("Bearer {first}"))));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=1; soda_session=abc ; b=2".parse().unwrap());
        assert_eq!(cookie_value(&h), Some("abc"));
        h.insert(header::COOKIE, "soda_session=".parse().unwrap());
        assert_eq!(cookie_value(&h), None);
        h.insert(header::COOKIE, "soda_sessionx=1".parse().unwrap());
        assert_eq!(cookie_value(&h), None);
    }

    #[test]
    fn sessions_end_when_their_token_leaves_the_file_and_stay_few() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let auth = Auth::new(path.clone(), crate::config::LegacyMode::Off, vec![]);
        let (id, csrf) = auth.sessions.create("first");
        assert!(!id.contains("first") && id.len() == 64);
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, format!("{COOKIE}={id}").parse().unwrap());
        let s = auth.sessions.from_cookie(&h, &auth).expect("a live session");
        assert!(!s.csrf_matches(&h));
        h.insert(CSRF_HEADER, csrf.parse().unwrap());
        assert!(s.csrf_matches(&h));
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, "second\n").unwrap();
        assert!(auth.sessions.from_cookie(&h, &auth).is_none(), "a rotated token ends its sessions");
        for _ in 0..MAX_SESSIONS + 10 {
            auth.sessions.create("second");
        }
        assert_eq!(auth.sessions.lock().len(), MAX_SESSIONS);
    }
}

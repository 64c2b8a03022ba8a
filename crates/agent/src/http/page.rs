//! The web page at `/`: one HTML page, its script and its style sheet,
//! embedded in the binary (no CDN, no build step), and the login sessions
//! behind it.
//!
//! Logging in (`POST /ui/login` with the API token) makes a session: a
//! random id kept in this process's memory, sent back in the cookie
//! `soda_session` (HttpOnly, SameSite=Strict, Secure when served over TLS),
//! and a random CSRF token the page keeps in memory and sends as
//! `X-CSRF-Token` on every request that may change something. The cookie
//! never holds the API token. A session remembers the token it was made
//! with and ends when that token leaves the token file, so rotating the
//! token logs everyone out; a restart of the agent ends every session too.
//! The `/v1` API itself admits the cookie in [`super::auth::guard`].

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::auth::{cookie_value, COOKIE, SESSION_LIFETIME};
use super::error::ApiJson;
use super::{ApiError, AppState};

const INDEX_HTML: &str = include_str!("page/index.html");
const APP_JS: &str = include_str!("page/app.js");
const APP_CSS: &str = include_str!("page/app.css");

/// No inline script or style, nothing from elsewhere, never in a frame.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The page's routes, merged into the API router.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/ui/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/ui/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }))
        .route("/ui/session", get(session))
        .route("/ui/login", post(login))
        .route("/ui/logout", post(logout))
}

/// The headers every page response carries.
fn protect(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    protect(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

fn set_cookie(value: &str, max_age: Duration, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}", max_age.as_secs())
        .parse()
        .expect("hex and fixed text make a valid header")
}

/// Over TLS the cookie is marked Secure (the agent serves TLS itself, or
/// not at all).
fn served_over_tls(state: &AppState) -> bool {
    state.config.tls_cert.is_some()
}

/// A cross-site request names another origin; the page's own requests name
/// this host or nothing (older browsers on same-origin GETs).
fn cross_site(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let origin_host = origin.split_once("://").map(|(_, h)| h).unwrap_or("");
    origin_host != host
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    token: String,
}

/// What the page keeps in memory while logged in.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SessionResponse {
    csrf_token: String,
    node: String,
}

fn session_response(state: &AppState, csrf: String) -> Json<SessionResponse> {
    let config = &state.config;
    Json(SessionResponse { csrf_token: csrf, node: config.node_name.clone() })
}

fn not_logged_in() -> Response {
    protect(
        ApiError::new(StatusCode::UNAUTHORIZED, "not_logged_in", "log in with the agent's API token").into_response(),
    )
}

/// The page asks on load whether its cookie is still a live session.
async fn session(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match state.auth.sessions.from_cookie(&headers, &state.auth) {
        Some(s) => protect(session_response(&state, s.csrf().to_string()).into_response()),
        None => not_logged_in(),
    }
}

async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<ApiJson<LoginRequest>, ApiError>,
) -> Response {
    if cross_site(&headers) {
        return protect(
            ApiError::new(StatusCode::FORBIDDEN, "cross_site_login", "logging in from another site is refused")
                .into_response(),
        );
    }
    let ApiJson(req) = match body {
        Ok(b) => b,
        Err(e) => return protect(e.into_response()),
    };
    let token = req.token.trim();
    if !state.auth.is_token(token) {
        state.auth.refused_tokens.fetch_add(1, Ordering::Relaxed);
        return protect(
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "wrong_token",
                "that is not this agent's API token: copy it from the agent's token file (by default <state-dir>/token)",
            )
            .into_response(),
        );
    }
    let (id, csrf) = state.auth.sessions.create(token);
    let mut r = session_response(&state, csrf).into_response();
    r.headers_mut().insert(header::SET_COOKIE, set_cookie(&id, SESSION_LIFETIME, served_over_tls(&state)));
    protect(r)
}

/// Ends the session; needs its CSRF token like any other change.
async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some(s) = state.auth.sessions.from_cookie(&headers, &state.auth) else {
        return not_logged_in();
    };
    if !s.csrf_matches(&headers) {
        return protect(
            ApiError::new(StatusCode::FORBIDDEN, "csrf_token_missing", "logging out needs the session's X-CSRF-Token")
                .into_response(),
        );
    }
    if let Some(id) = cookie_value(&headers) {
        state.auth.sessions.remove(id);
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut().insert(header::SET_COOKIE, set_cookie("", Duration::ZERO, served_over_tls(&state)));
    protect(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_another_origin_is_cross_site() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        assert!(!cross_site(&h));
        h.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        assert!(!cross_site(&h));
        h.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(cross_site(&h));
        h.insert(header::ORIGIN, "null".parse().unwrap());
        assert!(cross_site(&h));
    }
}

//! A string that must never be printed.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A secret value (repository password, cloud key). `Debug` and `Display`
/// print `***`, so a secret that reaches a log line or an error message by
/// mistake shows nothing. The value itself is read with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Replace every occurrence of each secret in `text` with `***`. Used on
/// restic's stderr before it becomes part of an error, because restic echoes
/// repository URLs, and a REST URL can carry a password.
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if s.len() >= 3 {
            out = out.replace(s, "***");
        }
    }
    out
}

/// A repository URL with any `user:password@` part replaced by `user:***@`,
/// for showing in API responses and logs.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let host_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..host_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    let user = userinfo.split(':').next().unwrap_or("");
    format!("{}{}:***@{}", &url[..scheme_end + 3], user, &rest[at + 1..])
}

/// The password inside a URL's userinfo, if any (so it can be scrubbed).
pub fn url_password(url: &str) -> Option<&str> {
    let scheme_end = url.find("://")?;
    let rest = &url[scheme_end + 3..];
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let at = authority.rfind('@')?;
    let userinfo = &authority[..at];
    let colon = userinfo.find(':')?;
    Some(&userinfo[colon + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints_its_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(redact_url("rest:http://u:p4ss@127.0.0.1:8000/repo/"), "rest:http://u:***@127.0.0.1:8000/repo/");
        assert_eq!(url_password("rest:http://u:p4ss@127.0.0.1:8000/repo/"), Some("p4ss"));
        assert_eq!(redact_url("s3:s3.amazonaws.com/bucket"), "s3:s3.amazonaws.com/bucket");
        assert_eq!(redact_url("/srv/repo"), "/srv/repo");
        assert_eq!(url_password("s3:http://host/bucket"), None);
    }

    #[test]
    fn scrub_replaces_every_secret() {
        assert_eq!(scrub("a p4ss b p4ss", &["p4ss"]), "a *** b ***");
    }
}

//! Where a restic repository is, from its URL in any form restic takes: the
//! one place that reads `local:`, `rest:` and the other backends' prefixes.

use std::path::Path;

/// restic's backends that are not a path on this machine.
pub const REMOTE_SCHEMES: [&str; 8] = ["sftp:", "rest:", "s3:", "azure:", "gs:", "swift:", "b2:", "rclone:"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepositoryLocation<'a> {
    /// A directory on this machine: `/srv/repo` or `local:/srv/repo`.
    Local(&'a Path),
    /// A REST server: the URL after `rest:` (`http://host:8000/repo/`).
    Rest(&'a str),
    /// Another backend that restic reaches over the network; its prefix.
    Remote(&'static str),
    /// A relative path, with or without `local:`: where it is would depend
    /// on the agent's working directory.
    Relative(&'a str),
}

impl<'a> RepositoryLocation<'a> {
    pub fn parse(url: &'a str) -> RepositoryLocation<'a> {
        if let Some(rest) = url.strip_prefix("rest:") {
            return RepositoryLocation::Rest(rest);
        }
        if let Some(scheme) = REMOTE_SCHEMES.iter().find(|s| url.starts_with(**s)) {
            return RepositoryLocation::Remote(scheme);
        }
        let path = url.strip_prefix("local:").unwrap_or(url);
        if path.starts_with('/') {
            RepositoryLocation::Local(Path::new(path))
        } else {
            RepositoryLocation::Relative(path)
        }
    }

    /// The directory of a repository on this machine.
    pub fn local_path(self) -> Option<&'a Path> {
        match self {
            RepositoryLocation::Local(p) => Some(p),
            _ => None,
        }
    }
}

/// A repository URL without the user and password of its authority, and
/// without a trailing slash, so `rest:http://u:***@h/r/` matches `rest:http://h/r`.
pub fn without_userinfo(url: &str) -> String {
    let s = match url.find("://") {
        Some(i) => {
            let rest = &url[i + 3..];
            let host_end = rest.find('/').unwrap_or(rest.len());
            match rest[..host_end].rfind('@') {
                Some(at) => format!("{}{}", &url[..i + 3], &rest[at + 1..]),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    };
    s.trim_end_matches('/').to_string()
}

#[cfg(test)]
mod tests {
    use super::without_userinfo;
    use super::RepositoryLocation::{self, *};
    use std::path::Path;

    #[test]
    fn agent_urls_match_the_configured_repository_without_credentials_or_trailing_slash() {
        assert_eq!(without_userinfo("rest:http://node:***@127.0.0.1:8000/r/"), "rest:http://127.0.0.1:8000/r");
        assert_eq!(without_userinfo("rest:http://127.0.0.1:8000/r"), "rest:http://127.0.0.1:8000/r");
        assert_eq!(without_userinfo("s3:http://h:9000/bucket/p"), "s3:http://h:9000/bucket/p");
        assert_eq!(without_userinfo("/srv/repo/"), "/srv/repo");
    }

    #[test]
    fn every_form_restic_takes_is_told_apart() {
        let cases: &[(&str, RepositoryLocation)] = &[
            ("/srv/repo", Local(Path::new("/srv/repo"))),
            ("local:/srv/repo", Local(Path::new("/srv/repo"))),
            ("local:srv/repo", Relative("srv/repo")),
            ("srv/repo", Relative("srv/repo")),
            ("rest:http://127.0.0.1:8000/r/", Rest("http://127.0.0.1:8000/r/")),
            ("s3:s3.amazonaws.com/bucket", Remote("s3:")),
            ("sftp:user@host:/srv/repo", Remote("sftp:")),
            ("rclone:remote:path", Remote("rclone:")),
            ("b2:bucket:path", Remote("b2:")),
        ];
        for (url, want) in cases {
            assert_eq!(RepositoryLocation::parse(url), *want, "{url}");
        }
        assert_eq!(RepositoryLocation::parse("local:/a").local_path(), Some(Path::new("/a")));
        assert_eq!(RepositoryLocation::parse("s3:h/b").local_path(), None);
    }
}

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

#[cfg(test)]
mod tests {
    use super::RepositoryLocation::{self, *};
    use std::path::Path;

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

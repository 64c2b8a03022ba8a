//! Identifiers and timestamps as the agent stores and shows them.

use chrono::{DateTime, SecondsFormat, Utc};

/// A new URL-safe id: 12 hex digits of milliseconds then 8 random hex
/// digits, so ids sort by creation time (run listings page on them).
pub fn new_id() -> String {
    let ms = Utc::now().timestamp_millis().max(0) as u64;
    let mut rnd = [0u8; 4];
    getrandom::fill(&mut rnd).expect("the OS random source is available");
    format!("{ms:012x}{:08x}", u32::from_le_bytes(rnd))
}

/// `n` random bytes as hex (passwords, tokens).
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).expect("the OS random source is available");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// RFC 3339 in UTC with milliseconds: fixed width, so it sorts as text.
pub fn fmt_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc))
}

/// A short stable hash (FNV-1a, hex) for keys and directory names.
pub fn short_hash(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0u8)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    format!("{h:016x}")
}

/// One URL path segment or query value, percent-encoded (RFC 3986 unreserved
/// characters kept), for the clients of the agent's and SODA's APIs.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_creation_time() {
        let a = new_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_id();
        assert!(a < b, "{a} {b}");
        assert_eq!(a.len(), 20);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn times_round_trip() {
        let t = parse_time("2026-01-02T03:04:05.678Z").unwrap();
        assert_eq!(fmt_time(t), "2026-01-02T03:04:05.678Z");
    }
}

//! Secrets at rest: repository passwords and keys are sealed with
//! ChaCha20-Poly1305 before they reach SQLite, under a key kept outside the
//! database (a file, 0600, created at first start, or the environment). A
//! copy of `state.db` alone reveals no secret. Losing the key is reported
//! per policy ("cannot unseal"), never a crash.

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const PREFIX: &str = "sealed:v1:";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cannot read the secrets key {path}: {message}")]
    Read { path: String, message: String },
    #[error("the secrets key {path} is not 64 hex digits")]
    Malformed { path: String },
    #[error("a stored secret cannot be unsealed with this agent's secrets key (was the key file replaced or lost?); enter the repository password again with PUT or PATCH")]
    WrongKey,
    #[error("a stored secret is sealed but the agent has no secrets key")]
    NoKey,
}

impl SealError {
    pub fn kind(&self) -> &'static str {
        match self {
            SealError::Read { .. } | SealError::Malformed { .. } => "secrets_key_unreadable",
            SealError::WrongKey | SealError::NoKey => "secrets_unavailable",
        }
    }
}

pub struct SealKey(Key);

impl SealKey {
    pub fn from_hex(hex: &str, origin: &str) -> Result<SealKey, SealError> {
        let hex = hex.trim();
        let malformed = || SealError::Malformed { path: origin.to_string() };
        if hex.len() != 64 {
            return Err(malformed());
        }
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| malformed())?;
        }
        Ok(SealKey(Key::from(bytes)))
    }

    /// Read the key file, creating it (32 random bytes, mode 0600) if it
    /// does not exist. Returns whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(SealKey, bool), SealError> {
        let read_err = |e: std::io::Error| SealError::Read { path: path.display().to_string(), message: e.to_string() };
        if !path.exists() {
            use std::io::Write;
            let mut f =
                std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(read_err)?;
            f.write_all(crate::ids::random_hex(32).as_bytes()).map_err(read_err)?;
            f.sync_all().map_err(read_err)?;
            let text = std::fs::read_to_string(path).map_err(read_err)?;
            return Ok((SealKey::from_hex(&text, &path.display().to_string())?, true));
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        Ok((SealKey::from_hex(&text, &path.display().to_string())?, false))
    }

    pub fn seal(&self, plaintext: &[u8]) -> String {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).expect("the OS random source is available");
        let ct =
            ChaCha20Poly1305::new(&self.0).encrypt(Nonce::from_slice(&nonce), plaintext).expect("in-memory encryption");
        let mut out = String::with_capacity(PREFIX.len() + 2 * (12 + ct.len()));
        out.push_str(PREFIX);
        for b in nonce.iter().chain(ct.iter()) {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }

    pub fn open(&self, text: &str) -> Result<Vec<u8>, SealError> {
        let hex = text.strip_prefix(PREFIX).ok_or(SealError::WrongKey)?;
        if hex.len() % 2 != 0 || hex.len() < 2 * 12 {
            return Err(SealError::WrongKey);
        }
        let bytes: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
            .collect::<Result<_, _>>()
            .map_err(|_| SealError::WrongKey)?;
        let (nonce, ct) = bytes.split_at(12);
        ChaCha20Poly1305::new(&self.0).decrypt(Nonce::from_slice(nonce), ct).map_err(|_| SealError::WrongKey)
    }
}

pub fn is_sealed(text: &str) -> bool {
    text.starts_with(PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_text_opens_with_its_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let (k, created) = SealKey::load_or_create(&dir.path().join("k")).unwrap();
        assert!(created);
        let (k2, created) = SealKey::load_or_create(&dir.path().join("k")).unwrap();
        assert!(!created);
        let sealed = k.seal(b"{\"password\":\"hunter2\"}");
        assert!(is_sealed(&sealed) && !sealed.contains("hunter2"));
        assert_ne!(sealed, k.seal(b"{\"password\":\"hunter2\"}"), "a fresh nonce each time");
        assert_eq!(k2.open(&sealed).unwrap(), b"{\"password\":\"hunter2\"}");
        let (other, _) = SealKey::load_or_create(&dir.path().join("other")).unwrap();
        assert!(matches!(other.open(&sealed), Err(SealError::WrongKey)));
        let mut tampered = sealed.clone();
        // Flip the last byte of the tag (writing a fixed "00" left it
        // unchanged 1 time in 256, and the test failed then).
        let last = u8::from_str_radix(&tampered[tampered.len() - 2..], 16).unwrap() ^ 0xff;
        tampered.replace_range(tampered.len() - 2.., &format!("{last:02x}"));
        assert_ne!(tampered, sealed);
        assert!(k.open(&tampered).is_err());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(dir.path().join("k")).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(SealKey::from_hex("abc", "x").is_err());
    }
}

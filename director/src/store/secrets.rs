//! Encryption at rest for the director's secrets (generated variable
//! values): AES-256-GCM with a random 96-bit nonce per value, under a key
//! kept in `<state-dir>/secrets.key` (mode 0600, created on first use).
//!
//! This module seals and opens bytes; it must not decide what is secret
//! and must never log a value.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use rand::RngCore;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the secrets key {0} is not 32 bytes: the state dir is damaged")]
    BadKey(PathBuf),
    #[error("opening a sealed secret: {0} (wrong secrets key or damaged value)")]
    Open(&'static str),
    #[error("sealing a secret failed")]
    Seal,
}

/// Seals and opens secrets with the state dir's key.
pub struct SecretBox {
    cipher: Aes256Gcm,
}

const NONCE_LEN: usize = 12;

impl SecretBox {
    /// Load the key at `path`, creating it (mode 0600) when missing.
    pub fn open_or_create(path: &Path) -> Result<SecretBox, SecretsError> {
        let io = |op, source| SecretsError::Io {
            op,
            path: path.to_path_buf(),
            source,
        };
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand::thread_rng().fill_bytes(&mut key);
                let tmp = path.with_extension("tmp");
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|e| io("creating the secrets key", e))?;
                f.write_all(&key)
                    .and_then(|_| f.sync_all())
                    .map_err(|e| io("writing the secrets key", e))?;
                fs::rename(&tmp, path).map_err(|e| io("installing the secrets key", e))?;
                key.to_vec()
            }
            Err(e) => return Err(io("reading the secrets key", e)),
        };
        // Whatever created it, keep it private.
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(|e| io("restricting the secrets key", e))?;
        let key = Key::<Aes256Gcm>::try_from(bytes.as_slice())
            .map_err(|_| SecretsError::BadKey(path.to_path_buf()))?;
        Ok(SecretBox {
            cipher: Aes256Gcm::new(&key),
        })
    }

    /// Encrypt: base64 of nonce || ciphertext+tag.
    pub fn seal(&self, plain: &[u8]) -> Result<String, SecretsError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let n = Nonce::try_from(&nonce[..]).map_err(|_| SecretsError::Seal)?;
        let ct = self
            .cipher
            .encrypt(&n, plain)
            .map_err(|_| SecretsError::Seal)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        Ok(base64::engine::general_purpose::STANDARD.encode(out))
    }

    /// Decrypt what [`SecretBox::seal`] produced.
    pub fn open(&self, sealed: &str) -> Result<Vec<u8>, SecretsError> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|_| SecretsError::Open("not base64"))?;
        if raw.len() < NONCE_LEN {
            return Err(SecretsError::Open("too short"));
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let n = Nonce::try_from(nonce).map_err(|_| SecretsError::Open("bad nonce"))?;
        self.cipher
            .decrypt(&n, ct)
            .map_err(|_| SecretsError::Open("authentication failed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_key_is_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let b = SecretBox::open_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let sealed = b.seal(b"hunter2").unwrap();
        assert!(!sealed.contains("hunter2"));
        assert_ne!(sealed, b.seal(b"hunter2").unwrap(), "fresh nonce each time");
        let again = SecretBox::open_or_create(&path).unwrap();
        assert_eq!(again.open(&sealed).unwrap(), b"hunter2");
        let mut bad = base64::engine::general_purpose::STANDARD
            .decode(&sealed)
            .unwrap();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let bad = base64::engine::general_purpose::STANDARD.encode(bad);
        assert!(again.open(&bad).is_err(), "tampering is detected");
    }
}

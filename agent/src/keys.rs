//! Ed25519 SSH keys in their OpenSSH encodings: generation, parsing, and the
//! agent's/director's on-disk private key file. Shared by the agent (host key,
//! authorized director key) and the director (its own key, pinned host keys).
//!
//! This module only handles key material; it must not open connections, must
//! not log private keys, and must never write a private key with permissions
//! wider than 0600.

use std::io::Write;
use std::path::Path;

use rand::RngCore;
use russh::keys::ssh_key::private::{Ed25519Keypair, KeypairData};
use russh::keys::ssh_key::LineEnding;
use russh::keys::{PrivateKey, PublicKey};

/// Comment embedded in generated keys.
const KEY_COMMENT: &str = "bosun";

/// Errors of key handling.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("parsing OpenSSH private key: {0}")]
    ParsePrivate(String),
    #[error("parsing OpenSSH public key: {0}")]
    ParsePublic(String),
    #[error("encoding key in OpenSSH format: {0}")]
    Encode(String),
    #[error("private key file {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("private key file {path}: {message}")]
    File { path: String, message: String },
}

/// An ed25519 key pair in OpenSSH encodings.
#[derive(Clone)]
pub struct KeyPair {
    /// OpenSSH PEM (`-----BEGIN OPENSSH PRIVATE KEY-----`), unencrypted.
    pub private_openssh: String,
    /// One line: `ssh-ed25519 AAAA... bosun`.
    pub public_openssh: String,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("private_openssh", &"***")
            .field("public_openssh", &self.public_openssh)
            .finish()
    }
}

impl KeyPair {
    /// Encode a parsed private key as a [`KeyPair`].
    pub fn from_private_key(key: &PrivateKey) -> Result<KeyPair, KeyError> {
        let private_openssh = key
            .to_openssh(LineEnding::LF)
            .map_err(|e| KeyError::Encode(e.to_string()))?
            .to_string();
        let public_openssh = key
            .public_key()
            .to_openssh()
            .map_err(|e| KeyError::Encode(e.to_string()))?;
        Ok(KeyPair {
            private_openssh,
            public_openssh,
        })
    }

    /// The parsed private key.
    pub fn private_key(&self) -> Result<PrivateKey, KeyError> {
        parse_private_key(&self.private_openssh)
    }
}

/// Generate a new ed25519 key pair from the OS random source.
pub fn generate_keypair() -> Result<KeyPair, KeyError> {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let keypair = Ed25519Keypair::from_seed(&seed);
    seed.fill(0);
    let key = PrivateKey::new(KeypairData::Ed25519(keypair), KEY_COMMENT)
        .map_err(|e| KeyError::Encode(e.to_string()))?;
    KeyPair::from_private_key(&key)
}

/// Read a private key (OpenSSH PEM) from `path`, or create one (file mode
/// 0600) if absent.
pub fn load_or_create_private_key(path: &Path) -> Result<KeyPair, KeyError> {
    let io_err = |source: std::io::Error| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = parse_private_key(&text).map_err(|e| KeyError::File {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            KeyPair::from_private_key(&key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let pair = generate_keypair()?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io_err)?;
            }
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut file = options.open(path).map_err(io_err)?;
            file.write_all(pair.private_openssh.as_bytes())
                .map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
            Ok(pair)
        }
        Err(e) => Err(io_err(e)),
    }
}

/// Parse an unencrypted OpenSSH private key (PEM).
pub fn parse_private_key(openssh: &str) -> Result<PrivateKey, KeyError> {
    let key = PrivateKey::from_openssh(openssh.trim().as_bytes())
        .map_err(|e| KeyError::ParsePrivate(e.to_string()))?;
    if key.is_encrypted() {
        return Err(KeyError::ParsePrivate(
            "key is encrypted with a passphrase; bosun needs an unencrypted key".into(),
        ));
    }
    Ok(key)
}

/// Parse a one-line OpenSSH public key (`ssh-ed25519 AAAA... [comment]`).
pub fn parse_public_key(openssh: &str) -> Result<PublicKey, KeyError> {
    PublicKey::from_openssh(openssh.trim()).map_err(|e| KeyError::ParsePublic(e.to_string()))
}

/// Whether two public keys are the same key (comments ignored).
pub fn same_key(a: &PublicKey, b: &PublicKey) -> bool {
    a.key_data() == b.key_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_parse_round_trip() {
        let pair = generate_keypair().unwrap();
        assert!(pair.public_openssh.starts_with("ssh-ed25519 "));
        let private = parse_private_key(&pair.private_openssh).unwrap();
        let public = parse_public_key(&pair.public_openssh).unwrap();
        assert!(same_key(private.public_key(), &public));
        let other = generate_keypair().unwrap();
        assert!(!same_key(
            &parse_public_key(&other.public_openssh).unwrap(),
            &public
        ));
        assert!(parse_public_key("ssh-ed25519 garbage").is_err());
        assert!(parse_private_key("not a key").is_err());
    }

    #[test]
    fn load_or_create_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/host_key");
        let first = load_or_create_private_key(&path).unwrap();
        let second = load_or_create_private_key(&path).unwrap();
        assert_eq!(first.public_openssh, second.public_openssh);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}

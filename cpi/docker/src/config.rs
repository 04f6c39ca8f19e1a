//! The Docker CPI's configuration ([`DockerCpiConfig`]): its records
//! directory, the daemon address, and the prefix of the objects it creates.
//!
//! This module must not talk to the daemon nor touch the file system.

use std::path::PathBuf;

use crate::names::sanitize_name;
use crate::{DockerCpiError, Result};

/// Configuration of the Docker CPI.
#[derive(Clone, Debug)]
pub struct DockerCpiConfig {
    /// The CPI's own records (VM create requests, disk sizes/metadata, snapshots), e.g. <state-dir>/docker-cpi
    pub root: PathBuf,
    /// Daemon address; None = DOCKER_HOST or unix:///var/run/docker.sock
    pub socket: Option<String>,
    /// Prefix of Docker object names this CPI creates (networks), e.g. "bosun"
    pub prefix: String,
}

impl DockerCpiConfig {
    /// The prefix, trimmed; refused unless it is a usable object name.
    pub(crate) fn validated_prefix(&self) -> Result<String> {
        let prefix = self.prefix.trim().to_string();
        if prefix.is_empty() || sanitize_name(&prefix, 64) != prefix {
            return Err(DockerCpiError::Config(format!(
                "prefix {:?} must be non-empty and use only [A-Za-z0-9_.-], starting with a letter or digit",
                self.prefix
            )));
        }
        Ok(prefix)
    }

    /// The daemon address as configured: the socket given, else DOCKER_HOST,
    /// else the default unix socket.
    pub(crate) fn socket(&self) -> String {
        match self.socket.clone().filter(|s| !s.trim().is_empty()) {
            Some(s) => s,
            None => std::env::var("DOCKER_HOST")
                .ok()
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string()),
        }
    }
}

/// The address to connect to: a bare path is a unix socket.
pub(crate) fn address(socket: &str) -> String {
    if socket.starts_with('/') {
        format!("unix://{socket}")
    } else {
        socket.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(prefix: &str, socket: Option<&str>) -> DockerCpiConfig {
        DockerCpiConfig {
            root: PathBuf::from("/nowhere"),
            socket: socket.map(String::from),
            prefix: prefix.into(),
        }
    }

    #[test]
    fn the_prefix_must_be_an_object_name() {
        assert_eq!(config(" bosun ", None).validated_prefix().unwrap(), "bosun");
        for bad in ["", "  ", "-x", "a/b", "a b"] {
            let err = config(bad, None)
                .validated_prefix()
                .unwrap_err()
                .to_string();
            assert!(err.contains("prefix"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_given_socket_wins_and_a_bare_path_is_a_unix_socket() {
        assert_eq!(config("b", Some("/run/d.sock")).socket(), "/run/d.sock");
        assert_eq!(address("/run/d.sock"), "unix:///run/d.sock");
        assert_eq!(address("tcp://h:2375"), "tcp://h:2375");
    }
}

//! BOSH's external CPI protocol, both ways.
//!
//! - [`ExternalCpi`] ([`client`]) is a [`bosun_cpi::Cpi`] that runs a CPI
//!   executable once per call (any BOSH CPI: docker, warden, vSphere,
//!   OpenStack, ...), with a time limit, and maps its answers and errors
//!   onto bosun's types.
//! - [`serve`] ([`server`]) answers one request with any `Cpi`, so
//!   `bosun cpi --backend local|docker|aws` is itself an external CPI.
//! - [`wire`] holds the protocol's shapes and the translation of bosun's
//!   agent settings into BOSH's `create_vm` arguments (bosun's keys and
//!   port under `env.bosun`).
//!
//! This crate must not know about manifests, deployments or the agent
//! protocol, and must never log request bodies: they carry the agent's
//! private host key and the CPI's credentials.

pub mod client;
pub mod config;
pub mod server;
pub mod wire;

use std::path::PathBuf;

pub use client::ExternalCpi;
pub use config::{ExternalCpiConfig, DEFAULT_TIMEOUT};
pub use server::serve;

/// Setting an external CPI up failed.
#[derive(Debug, thiserror::Error)]
pub enum ExternalCpiError {
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the config file of CPI '{cpi}'")]
    Record {
        cpi: String,
        #[source]
        source: bosun_cpi::records::RecordError,
    },
}

//! The local CPI's configuration ([`LocalCpiConfig`]) and its validation.
//!
//! This module must not touch the file system or start processes: it only
//! says whether a configuration is usable.

use std::path::PathBuf;

use crate::{LocalCpiError, Result};

/// Configuration of the local CPI.
#[derive(Clone, Debug)]
pub struct LocalCpiConfig {
    /// Where VMs, disks and stemcells live, e.g. <state-dir>/local-cpi
    pub root: PathBuf,
    /// The program to run as the agent, with its leading args, e.g. ["/path/to/bosun", "agent"].
    pub agent_command: Vec<String>,
}

impl LocalCpiConfig {
    /// Refuses a configuration the CPI cannot run with.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.agent_command.is_empty() || self.agent_command[0].is_empty() {
            return Err(LocalCpiError::Config(
                "agent_command is empty (want e.g. [\"/path/to/bosun\", \"agent\"])".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{LocalCpi, LocalCpiConfig};

    #[test]
    fn empty_agent_command_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let err = LocalCpi::new(LocalCpiConfig {
            root: tmp.path().into(),
            agent_command: vec![],
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("agent_command"), "{err}");
    }
}

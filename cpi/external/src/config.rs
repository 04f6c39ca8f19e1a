//! How an external CPI is run: its executable and arguments, the config
//! file bosun writes for it, the properties sent in every request's
//! context, the per-call time limit, and where its records are kept.
//!
//! It must not run the CPI.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::ExternalCpiError;

/// BOSH's time a CPI call may take is unbounded; bosun's default limit.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// An external CPI, ready to run.
#[derive(Clone, Debug)]
pub struct ExternalCpiConfig {
    /// The name the cloud-config gives it (in every error and log line).
    pub name: String,
    pub exec_path: PathBuf,
    pub args: Vec<String>,
    /// Sent in every request's `context` (BOSH's cpi-config `properties`).
    pub properties: Value,
    /// How long one call may take before the CPI is killed.
    pub timeout: Duration,
    /// bosun's records of the CPI's VMs and disks, and its config file.
    pub root: PathBuf,
    pub director_uuid: String,
    /// The `vm.stemcell.api_version` of the context: 2, as bosun's agent
    /// reads its settings from the env a v2 CPI delivers.
    pub stemcell_api_version: u32,
}

impl ExternalCpiConfig {
    pub fn new(name: &str, exec_path: impl Into<PathBuf>, root: impl Into<PathBuf>) -> Self {
        ExternalCpiConfig {
            name: name.to_string(),
            exec_path: exec_path.into(),
            args: Vec::new(),
            properties: Value::Object(serde_json::Map::new()),
            timeout: DEFAULT_TIMEOUT,
            root: root.into(),
            director_uuid: String::new(),
            stemcell_api_version: 2,
        }
    }

    /// Writes `config` as the CPI's config file (`<root>/config.json`,
    /// 0600: it usually holds credentials) and passes its path after
    /// `arg` (BOSH's Go CPIs take `-configPath FILE`).
    pub fn with_config_file(mut self, config: &Value, arg: &str) -> Result<Self, ExternalCpiError> {
        std::fs::create_dir_all(&self.root).map_err(|source| ExternalCpiError::Io {
            op: "creating",
            path: self.root.clone(),
            source,
        })?;
        let path = self.root.join("config.json");
        bosun_cpi::records::write_json(&path, config, 0o600).map_err(|source| {
            ExternalCpiError::Record {
                cpi: self.name.clone(),
                source,
            }
        })?;
        if !arg.is_empty() {
            self.args.push(arg.to_string());
        }
        self.args.push(path.display().to_string());
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_config_file_is_private_and_named_after_its_flag() {
        let dir = tempfile::tempdir().unwrap();
        let c = ExternalCpiConfig::new("ext", "/bin/cpi", dir.path().join("ext"))
            .with_config_file(&serde_json::json!({"secret": "s"}), "-configPath")
            .unwrap();
        let path = dir.path().join("ext/config.json");
        assert_eq!(
            c.args,
            vec!["-configPath".to_string(), path.display().to_string()]
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back["secret"], "s");
    }
}

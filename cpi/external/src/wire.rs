//! The protocol's shapes: one request (`method`, `arguments`, `context`,
//! `api_version`) and one response (`result`, `error`, `log`) per process,
//! and the translation of bosun's CPI types to and from BOSH's argument
//! shapes (stemcells, metadata, cids, error types; networks, the `env` that
//! carries bosun's agent keys under `env.bosun` and disk hints are
//! `bosun_cpi::agent_env`'s, re-exported here).
//!
//! Pure data: this module must not run processes or touch files.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use bosun_cpi::agent_env::{
    disk_hint_from_bosh, env_to_bosh, fields_of, networks_from_bosh, networks_to_bosh,
    object_or_empty, range_of, settings_from_bosh, BosunEnv, BOSUN_ENV_KEY,
};

use bosun_cpi::{CpiError, DiskCid, Metadata, StemcellCid, StemcellSpec, VmCid};

/// The newest protocol version bosun speaks.
pub const API_VERSION: u32 = 2;

/// One request, as written to the CPI's stdin.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    pub method: String,
    #[serde(default)]
    pub arguments: Vec<Value>,
    #[serde(default)]
    pub context: Value,
    /// Absent in v1 requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<u32>,
}

/// One response, as read from the CPI's stdout.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Response {
    #[serde(default)]
    pub result: Value,
    #[serde(default)]
    pub error: Option<WireError>,
    #[serde(default)]
    pub log: String,
}

/// A CPI's error, as BOSH's CPIs write it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireError {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub ok_to_retry: bool,
}

/// BOSH's error type names (the `Bosh::Clouds::` prefix is optional on input).
pub mod error_type {
    pub const CLOUD_ERROR: &str = "Bosh::Clouds::CloudError";
    pub const CPI_ERROR: &str = "Bosh::Clouds::CpiError";
    pub const NOT_IMPLEMENTED: &str = "Bosh::Clouds::NotImplemented";
    pub const NOT_SUPPORTED: &str = "Bosh::Clouds::NotSupported";
    pub const VM_NOT_FOUND: &str = "Bosh::Clouds::VMNotFound";
    pub const DISK_NOT_FOUND: &str = "Bosh::Clouds::DiskNotFound";
    pub const VM_CREATION_FAILED: &str = "Bosh::Clouds::VMCreationFailed";
}

impl WireError {
    /// The error type without BOSH's module prefix (`VMNotFound`).
    pub fn short_kind(&self) -> &str {
        self.kind.rsplit("::").next().unwrap_or(&self.kind)
    }

    /// bosun's error for a server to answer with.
    pub fn from_cpi_error(e: &CpiError) -> WireError {
        let (kind, ok_to_retry) = match e {
            CpiError::VmNotFound(_) => (error_type::VM_NOT_FOUND, false),
            CpiError::DiskNotFound(_) => (error_type::DISK_NOT_FOUND, false),
            CpiError::NotSupported { .. } => (error_type::NOT_SUPPORTED, false),
            CpiError::Transient { .. } => (error_type::CLOUD_ERROR, true),
            CpiError::StemcellNotFound(_) | CpiError::Fatal { .. } => {
                (error_type::CLOUD_ERROR, false)
            }
        };
        WireError {
            kind: kind.to_string(),
            message: e.to_string(),
            ok_to_retry,
        }
    }
}

/// The `cloud_properties` argument of `create_stemcell`: the stemcell's own,
/// with its name, version and os added where it does not set them.
pub fn stemcell_properties_to_wire(spec: &StemcellSpec) -> Value {
    let mut m = fields_of(&spec.cloud_properties);
    for (k, v) in [
        ("name", &spec.name),
        ("version", &spec.version),
        ("os", &spec.os),
    ] {
        m.entry(k.to_string()).or_insert_with(|| json!(v));
    }
    Value::Object(m)
}

/// `create_stemcell`'s arguments as bosun's stemcell (name, version and os
/// taken out of the cloud properties again).
pub fn stemcell_from_wire(image_path: &str, cloud_properties: &Value) -> StemcellSpec {
    let text = |k: &str| {
        cloud_properties
            .get(k)
            .and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .unwrap_or_else(|| "unknown".to_string())
    };
    let mut rest = fields_of(cloud_properties);
    for k in ["name", "version", "os"] {
        rest.remove(k);
    }
    StemcellSpec {
        name: text("name"),
        os: text("os"),
        version: text("version"),
        image_path: (!image_path.is_empty()).then(|| image_path.into()),
        cloud_properties: Value::Object(rest),
    }
}

/// The argument at `i` as a string (a cid, a path).
pub fn string_arg(args: &[Value], i: usize, what: &str) -> Result<String, String> {
    match args.get(i) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!(
            "argument {i} ({what}) must be a string, got {other}"
        )),
        None => Err(format!("argument {i} ({what}) is missing")),
    }
}

/// The argument at `i` as metadata (string values; numbers and booleans
/// are written as text, as BOSH's CPIs receive tags).
pub fn metadata_arg(args: &[Value], i: usize) -> Result<Metadata, String> {
    let v = args.get(i).unwrap_or(&Value::Null);
    metadata_from_wire(v).map_err(|e| format!("argument {i} (metadata): {e}"))
}

/// A metadata hash, values as text.
pub fn metadata_from_wire(v: &Value) -> Result<Metadata, String> {
    match v {
        Value::Null => Ok(Metadata::new()),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(_) | Value::Bool(_) => v.to_string(),
                    other => return Err(format!("{k} must be a string, got {other}")),
                };
                Ok((k.clone(), text))
            })
            .collect(),
        other => Err(format!("must be a hash, got {other}")),
    }
}

/// A list of cids, read.
pub fn cids_from_wire(v: &Value) -> Result<Vec<String>, String> {
    bosun_cpi::agent_env::string_list(v, "the list of cids")
}

/// Stemcell, VM and disk cids as wire strings.
pub fn vm_cid(v: &VmCid) -> Value {
    json!(v.0)
}
pub fn disk_cid(v: &DiskCid) -> Value {
    json!(v.0)
}
pub fn stemcell_cid(v: &StemcellCid) -> Value {
    json!(v.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_boshs_types() {
        let e = WireError::from_cpi_error(&CpiError::VmNotFound(VmCid("v".into())));
        assert_eq!(
            (e.kind.as_str(), e.short_kind()),
            (error_type::VM_NOT_FOUND, "VMNotFound")
        );
        let e = WireError::from_cpi_error(&CpiError::Transient {
            message: "busy".into(),
            retry_after: None,
        });
        assert!(e.ok_to_retry);
        let short = WireError {
            kind: "DiskNotFound".into(),
            message: String::new(),
            ok_to_retry: false,
        };
        assert_eq!(short.short_kind(), "DiskNotFound");
    }

    #[test]
    fn stemcells_keep_name_version_and_os() {
        let spec = StemcellSpec {
            name: "bosh-docker".into(),
            os: "ubuntu-jammy".into(),
            version: "1.5".into(),
            image_path: Some("/tmp/image".into()),
            cloud_properties: json!({"image_id": "i"}),
        };
        let wire = stemcell_properties_to_wire(&spec);
        assert_eq!(wire["image_id"], "i");
        assert_eq!(stemcell_from_wire("/tmp/image", &wire), spec);
    }
}

//! Fixtures shared by the local CPI's unit tests: a CPI in a temporary
//! directory, VM requests, and VM directories without an agent.
//!
//! This module must not be compiled outside tests.

use std::collections::BTreeMap;
use std::path::Path;

use bosun_cpi::{AgentSettings, CreateVmRequest, Metadata, StemcellCid, StemcellSpec, VmCid};

use crate::files::read_json;
use crate::{LocalCpi, LocalCpiConfig};

pub(crate) fn cpi(dir: &Path) -> LocalCpi {
    LocalCpi::new(LocalCpiConfig {
        root: dir.join("local-cpi"),
        agent_command: vec!["/bin/false".into()],
    })
    .unwrap()
}

pub(crate) fn vm_request(stemcell: &StemcellCid) -> CreateVmRequest {
    let settings = AgentSettings {
        agent_id: "agent-1".into(),
        director_public_key: "ssh-ed25519 AAAA director".into(),
        host_private_key: "-----BEGIN OPENSSH PRIVATE KEY-----".into(),
        listen_ip: "127.0.0.9".into(),
        listen_port: bosun_cpi::AGENT_PORT,
        networks: BTreeMap::new(),
        disks: BTreeMap::new(),
        env: serde_json::json!({"x": 1}),
    };
    CreateVmRequest {
        agent_id: "agent-1".into(),
        stemcell: stemcell.clone(),
        cloud_properties: serde_json::json!({}),
        networks: BTreeMap::new(),
        disk_cids: Vec::new(),
        settings,
        metadata: Metadata::from([("token".into(), "t".into())]),
    }
}

pub(crate) fn stemcell_spec() -> StemcellSpec {
    StemcellSpec {
        name: "bosh-local".into(),
        os: "ubuntu-noble".into(),
        version: "1".into(),
        image_path: None,
        cloud_properties: serde_json::json!({}),
    }
}

/// A VM directory without its agent.
pub(crate) fn fake_vm(c: &LocalCpi) -> VmCid {
    let sc = c.inner.create_stemcell(&stemcell_spec()).unwrap();
    c.inner.prepare_vm_dir(&vm_request(&sc)).unwrap()
}

pub(crate) fn settings_disks(c: &LocalCpi, vm: &VmCid) -> serde_json::Value {
    let s: serde_json::Value = read_json(&c.inner.settings_file(vm)).unwrap().unwrap();
    s["disks"].clone()
}

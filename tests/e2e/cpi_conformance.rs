//! The CPI conformance suite against the local CPI, with the real agent
//! (`bosun agent`) as each VM's process: directly, and through BOSH's
//! external CPI protocol (`ExternalCpi` running `bosun cpi --backend
//! local` once per call).

use bosun_cpi::conformance::{self, Fixture};
use bosun_cpi::StemcellSpec;
use bosun_cpi_external::{ExternalCpi, ExternalCpiConfig};
use bosun_cpi_local::{LocalCpi, LocalCpiConfig};

use crate::support::BOSUN;

#[tokio::test]
async fn local_cpi_passes_conformance_with_the_real_agent() {
    let dir = tempfile::tempdir().unwrap();
    let cpi = LocalCpi::new(LocalCpiConfig {
        root: dir.path().join("local-cpi"),
        agent_command: vec![BOSUN.to_string(), "agent".to_string()],
    })
    .unwrap();
    if let Err(failures) = conformance::run(&cpi, &fixture("127.103.0", host_stemcell())).await {
        panic!("conformance failures:\n  {}", failures.join("\n  "));
    }
}

/// `bosun cpi --backend BACKEND` as an external CPI, its records and config
/// under `dir`.
pub fn bosun_as_external_cpi(
    backend: &str,
    dir: &std::path::Path,
    config: serde_json::Value,
) -> ExternalCpi {
    let mut c = ExternalCpiConfig::new("bosun-cpi", BOSUN, dir.join("external-cpi"));
    c.args = vec!["cpi".into(), "--backend".into(), backend.into()];
    c.director_uuid = "e2e-director".into();
    c.timeout = std::time::Duration::from_secs(120);
    ExternalCpi::new(c.with_config_file(&config, "--config").unwrap())
}

#[tokio::test]
async fn local_cpi_passes_conformance_through_the_external_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("local-cpi");
    let cpi = bosun_as_external_cpi("local", dir.path(), serde_json::json!({"root": root}));
    if let Err(failures) = conformance::run(&cpi, &fixture("127.206.0", host_stemcell())).await {
        panic!("conformance failures:\n  {}", failures.join("\n  "));
    }
    // The VMs were the local CPI's, and every one is gone again.
    let vms = std::fs::read_dir(root.join("vms")).unwrap().count();
    assert_eq!(vms, 0, "VMs left under {}", root.display());
}

/// The local CPI's stemcell: the host itself.
fn host_stemcell() -> StemcellSpec {
    StemcellSpec {
        name: "bosun-local-host".into(),
        os: "local".into(),
        version: "1".into(),
        image_path: None,
        cloud_properties: serde_json::json!({}),
    }
}

/// VMs on `<subnet>.0/24` (VM n at `<subnet>.<10 + n>`), each with the
/// real agent's keys.
pub fn fixture(subnet: &str, stemcell: StemcellSpec) -> Fixture {
    let director = bosun_agent::keys::generate_keypair().unwrap();
    let subnet = subnet.to_string();
    Fixture {
        stemcell,
        vm_request: Box::new(move |n, stemcell| {
            let host = bosun_agent::keys::generate_keypair().unwrap();
            let mut req = conformance::manual_vm_request(
                &format!("agent-{n}"),
                stemcell,
                &format!("{subnet}.{}", 10 + n),
                &format!("{subnet}.0/24"),
                &director.public_openssh,
                &host.private_openssh,
            );
            req.metadata = [("token".to_string(), format!("conformance-{n}"))].into();
            req
        }),
        disk_size_mb: 64,
    }
}

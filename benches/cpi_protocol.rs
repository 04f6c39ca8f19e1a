//! Per-call overhead of BOSH's external CPI protocol: the local CPI called
//! directly versus the same backend behind `bosun cpi --backend local`,
//! one process per call. Median and 90th percentile over N calls (default
//! 100) of `create_vm` (each VM deleted again, untimed) and `has_vm`.
//! Run with `bench/cpi-protocol.sh [N]`; `cargo test` runs it with three
//! calls each.

use std::time::{Duration, Instant};

use bosun_cpi::conformance::manual_vm_request;
use bosun_cpi::{Cpi, CreateVmRequest, StemcellCid, StemcellSpec};
use bosun_cpi_external::{ExternalCpi, ExternalCpiConfig};
use bosun_cpi_local::{LocalCpi, LocalCpiConfig};

const BOSUN: &str = env!("CARGO_BIN_EXE_bosun");

fn request(n: usize, stemcell: &StemcellCid, director_key: &str) -> CreateVmRequest {
    let host = bosun_agent::keys::generate_keypair().expect("a host key");
    let ip = format!("127.199.{}.{}", n / 200, 10 + n % 200);
    manual_vm_request(
        &format!("bench-{n}"),
        stemcell,
        &ip,
        "127.199.0.0/16",
        director_key,
        &host.private_openssh,
    )
}

fn stats(mut d: Vec<Duration>) -> String {
    d.sort();
    let ms = |x: Duration| x.as_secs_f64() * 1000.0;
    format!(
        "median {:7.2} ms   p90 {:7.2} ms",
        ms(d[d.len() / 2]),
        ms(d[d.len() * 9 / 10])
    )
}

async fn measure(name: &str, cpi: &dyn Cpi, calls: usize) -> (Duration, Duration) {
    let director = bosun_agent::keys::generate_keypair().expect("a director key");
    let spec = StemcellSpec {
        name: "bench".into(),
        os: "local".into(),
        version: "1".into(),
        image_path: None,
        cloud_properties: serde_json::json!({}),
    };
    let stemcell = cpi.create_stemcell(&spec).await.expect("create_stemcell");
    let mut creates = Vec::new();
    for n in 0..calls {
        let req = request(n, &stemcell, &director.public_openssh);
        let t = Instant::now();
        let vm = cpi.create_vm(&req).await.expect("create_vm");
        creates.push(t.elapsed());
        cpi.delete_vm(&vm).await.expect("delete_vm");
    }
    let vm = cpi
        .create_vm(&request(calls, &stemcell, &director.public_openssh))
        .await
        .expect("create_vm");
    let mut has = Vec::new();
    for _ in 0..calls {
        let t = Instant::now();
        assert!(cpi.has_vm(&vm).await.expect("has_vm"));
        has.push(t.elapsed());
    }
    cpi.delete_vm(&vm).await.expect("delete_vm");
    cpi.delete_stemcell(&stemcell)
        .await
        .expect("delete_stemcell");
    let median = |d: &[Duration]| {
        let mut d = d.to_vec();
        d.sort();
        d[d.len() / 2]
    };
    println!("{name:>9} create_vm: {}", stats(creates.clone()));
    println!("{name:>9} has_vm:    {}", stats(has.clone()));
    (median(&creates), median(&has))
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs this too (without `--bench`): then
    // three calls each show that it still works.
    let benching = std::env::args().any(|a| a == "--bench");
    let calls: usize = match std::env::var("CALLS").ok().and_then(|s| s.parse().ok()) {
        Some(n) if benching => n,
        _ if benching => 100,
        _ => 3,
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let local = LocalCpi::new(LocalCpiConfig {
        root: dir.path().join("direct"),
        agent_command: vec![BOSUN.to_string(), "agent".to_string()],
    })
    .expect("the local CPI");
    let mut config = ExternalCpiConfig::new("bench", BOSUN, dir.path().join("external"));
    config.args = vec!["cpi".into(), "--backend".into(), "local".into()];
    let config = config
        .with_config_file(
            &serde_json::json!({"root": dir.path().join("protocol")}),
            "--config",
        )
        .expect("the config file");
    let external = ExternalCpi::new(config);
    println!("{calls} calls each, local backend ({BOSUN})");
    let (dc, dh) = measure("direct", &local, calls).await;
    let (pc, ph) = measure("protocol", &external, calls).await;
    let ms = |a: Duration, b: Duration| (a.as_secs_f64() - b.as_secs_f64()) * 1000.0;
    println!(
        "overhead per call (median): create_vm {:+.2} ms, has_vm {:+.2} ms",
        ms(pc, dc),
        ms(ph, dh)
    );
}

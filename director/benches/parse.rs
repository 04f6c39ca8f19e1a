//! Benchmark of reading a big manifest: a generated document of about 50 MB
//! (instance groups of 1000 properties each) through the reader `deploy`
//! uses (`manifest::parse_manifest`, then `cloud_config::validate_manifest`
//! against the built-in cloud-config) and through `interpolate`, for three
//! variants: valid, a duplicate key on the last line, and `instances:
//! 10000000` in the last group. The target is under 5 s for each.
//!
//! Run with `cargo bench -p bosun-director --bench parse` (`BENCH_MB` sets
//! the size). It prints the minimum and maximum of the timed runs.
//!
//! This benchmark reads and writes nothing: the manifest is made in memory.

use std::path::Path;
use std::time::{Duration, Instant};

use bosun_director::interpolate::{interpolate_value, InterpolateOptions};
use bosun_director::model::cloud_config::default_local;
use bosun_director::model::manifest::parse_manifest;
use bosun_director::validate_manifest;

const RUNS: usize = 3;

fn manifest(size: usize, variant: &str) -> String {
    let mut m = String::from(
        "name: big\nreleases:\n- name: kv\n  version: latest\nstemcells:\n- alias: default\n  \
         os: ubuntu-jammy\n  version: latest\nupdate:\n  canaries: 1\n  max_in_flight: 1\n  \
         canary_watch_time: 1000\n  update_watch_time: 1000\ninstance_groups:\n",
    );
    let mut g = 0;
    while m.len() < size {
        m.push_str(&format!(
            "- name: g{g}\n  instances: 0\n  azs: [z1]\n  vm_type: default\n  \
             stemcell: default\n  networks:\n  - name: default\n  jobs:\n  - name: kv\n    \
             release: kv\n    properties:\n      kv:\n        port: 8080\n        extra:\n"
        ));
        for k in 0..1000 {
            m.push_str(&format!("          key{k}: value-{g}-{k}-0123456789\n"));
        }
        g += 1;
    }
    if variant == "dup" {
        m.push_str("          key7: again\n");
    }
    if variant == "huge" {
        if let Some(at) = m.rfind("  instances: 0\n") {
            m.replace_range(at..at + 15, "  instances: 10000000\n");
        }
    }
    m
}

fn time(what: &str, mut f: impl FnMut() -> String) {
    let mut times = Vec::new();
    let mut outcome = String::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        outcome = f();
        times.push(t.elapsed());
    }
    times.sort();
    let s = |d: Duration| d.as_secs_f64();
    println!(
        "{what:<22} min {:6.2} s  max {:6.2} s  {outcome}",
        s(times[0]),
        s(times[RUNS - 1])
    );
}

fn main() {
    let mb: usize = std::env::var("BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let cc = default_local();
    for variant in ["ok", "dup", "huge"] {
        let text = manifest(mb * 1_000_000, variant);
        if variant == "ok" {
            println!(
                "manifest: {} MB, {} lines",
                text.len() / 1_000_000,
                text.lines().count()
            );
        }
        time(
            &format!("parse+validate {variant}"),
            || match parse_manifest("big.yml", &text, Path::new("/")) {
                Err(p) => format!("refused: {}", p.0[0]),
                Ok(m) => match validate_manifest(&m, &cc) {
                    Ok(()) => format!("valid, {} groups", m.instance_groups.len()),
                    Err(p) => format!("refused: {}", p.0[0]),
                },
            },
        );
        time(
            &format!("interpolate {variant}"),
            || match interpolate_value("big.yml", &text, &InterpolateOptions::default()) {
                Ok(_) => "read".to_string(),
                Err(e) => format!("refused: {e}"),
            },
        );
    }
}

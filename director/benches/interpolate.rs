//! Benchmark of `bosun_director::interpolate::interpolate`: a generated
//! manifest of about 3,000 lines (60 instance groups, placeholders in every
//! job, a `variables:` section of passwords and certificates) with 40 ops
//! files mixing replace, remove, append, `key=value`, optional paths,
//! `:after` insertion and tests, through a `--vars-store` file.
//!
//! Run with `cargo bench -p bosun-director --bench interpolate`. It prints
//! the minimum, median and maximum of the timed runs (the store is filled
//! by an untimed warm-up run, so keys are not generated while timing).
//!
//! This benchmark only reads and writes files in a temporary directory; it
//! does not touch the director's state, CPIs or the network.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use bosun_director::interpolate::{interpolate, InterpolateOptions};

const GROUPS: usize = 60;
const OPS_FILES: usize = 40;
const RUNS: usize = 30;

fn manifest() -> String {
    let mut m = String::new();
    m.push_str("name: bench\n");
    m.push_str("releases:\n");
    for r in 0..5 {
        let _ = writeln!(m, "- name: r{r}\n  version: \"1.{r}\"");
    }
    m.push_str("stemcells:\n- alias: default\n  os: ubuntu-jammy\n  version: latest\n");
    m.push_str("update:\n  canaries: 1\n  max_in_flight: 2\n  canary_watch_time: 1000-30000\n  update_watch_time: 1000-30000\n");
    m.push_str("instance_groups:\n");
    for g in 0..GROUPS {
        let _ = writeln!(m, "- name: ig{g}");
        m.push_str("  instances: 2\n  azs: [z1, z2]\n  vm_type: default\n  stemcell: default\n  persistent_disk: 1024\n");
        m.push_str("  networks:\n  - name: default\n    static_ips: [10.0.0.10, 10.0.0.11]\n");
        m.push_str("  jobs:\n");
        for (j, job) in ["job-a", "job-b", "job-c"].iter().enumerate() {
            let _ = writeln!(m, "  - name: {job}\n    release: r{}", (g + j) % 5);
            m.push_str("    properties:\n");
            m.push_str("      port: ((port))\n");
            let _ = writeln!(m, "      password: ((pw{}))", (g + j) % 20);
            m.push_str("      url: https://((host)):((port))/api/v1\n");
            if j == 0 {
                m.push_str("      tls:\n        ca: ((server.ca))\n        certificate: ((server.certificate))\n        private_key: ((server.private_key))\n");
            } else {
                m.push_str("      log_level: info\n      timeouts: {connect: 5, read: 30}\n      peers: [a, b, c]\n");
            }
            m.push_str("      nested:\n        a:\n          b: {c: d, e: [1, 2, 3]}\n");
        }
        m.push_str("  env:\n    bosh:\n      password: ((pw0))\n");
    }
    m.push_str("variables:\n");
    for p in 0..20 {
        let _ = writeln!(m, "- name: pw{p}\n  type: password");
    }
    m.push_str(
        "- name: ca\n  type: certificate\n  options:\n    is_ca: true\n    common_name: bench-ca\n",
    );
    m.push_str("- name: server\n  type: certificate\n  options:\n    ca: ca\n    common_name: ((host))\n    alternative_names: [((host)), 10.0.0.10]\n");
    m
}

fn ops_file(i: usize) -> String {
    let g = i % GROUPS;
    match i % 8 {
        0 => format!(
            "- type: replace\n  path: /instance_groups/name=ig{g}/instances\n  value: 5\n\
             - type: replace\n  path: /instance_groups/name=ig{g}/vm_type\n  value: large\n"
        ),
        1 => format!(
            "- type: remove\n  path: /instance_groups/name=ig{g}/jobs/name=job-c\n\
             - type: remove\n  path: /instance_groups/name=ig{g}/persistent_disk\n\
             - type: remove\n  path: /instance_groups/name=ig{g}/missing?\n"
        ),
        2 => format!(
            "- type: replace\n  path: /instance_groups/name=ig{g}/jobs/-\n  value:\n    name: extra\n    release: r1\n    properties:\n      secret: ((pw7))\n      port: ((port))\n"
        ),
        3 => format!(
            "- type: replace\n  path: /instance_groups/name=ig{g}/jobs/name=job-a/properties/features?/deep/enabled\n  value: true\n\
             - type: replace\n  path: /instance_groups/name=ig{g}/jobs/name=job-b/properties/peers/-1\n  value: z\n"
        ),
        4 => format!(
            "- type: replace\n  path: /instance_groups/name=ig{g}/networks/0:after\n  value: {{name: other}}\n\
             - type: replace\n  path: /instance_groups/name=ig{g}/azs/0:before\n  value: z0\n"
        ),
        5 => format!(
            "- type: replace\n  path: /instance_groups/name=added{i}?/instances\n  value: 1\n\
             - type: replace\n  path: /instance_groups/name=added{i}/jobs?/-\n  value: {{name: job-a, release: r0}}\n"
        ),
        6 => format!(
            "- type: test\n  path: /instance_groups/name=ig{g}/stemcell\n  value: default\n\
             - type: test\n  path: /instance_groups/name=ig{g}/nope\n  absent: true\n\
             - type: replace\n  path: /instance_groups/name=ig{g}/env/bosh/keep_root_password?\n  value: false\n"
        ),
        _ => format!(
            "- type: replace\n  path: /releases/name=r{}/version\n  value: \"2.{i}\"\n\
             - type: replace\n  path: /update/max_in_flight\n  value: {}\n",
            i % 5,
            1 + i % 4
        ),
    }
}

fn main() {
    let text = manifest();
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cannot create a temporary directory: {e}");
            std::process::exit(1);
        }
    };
    let opts = InterpolateOptions {
        ops_files: (0..OPS_FILES)
            .map(|i| (format!("ops-{i}.yml"), ops_file(i)))
            .collect(),
        vars: vec![
            ("host".to_string(), "api.example.com".to_string()),
            ("port".to_string(), "8443".to_string()),
        ],
        vars_store: Some(dir.path().join("creds.yml")),
        var_errs: true,
        ..InterpolateOptions::default()
    };
    let ops_count: usize = opts
        .ops_files
        .iter()
        .map(|(_, t)| t.matches("- type:").count())
        .sum();

    // Warm-up: generates the passwords and certificates into the store.
    let started = Instant::now();
    let out = match interpolate("bench.yml", &text, &opts) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("interpolate failed: {e}");
            std::process::exit(1);
        }
    };
    let warmup = started.elapsed();

    let mut times: Vec<Duration> = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let t = Instant::now();
        let again = interpolate("bench.yml", &text, &opts);
        times.push(t.elapsed());
        match again {
            Ok(o) if o == out => {}
            Ok(_) => {
                eprintln!("output changed between runs");
                std::process::exit(1);
            }
            Err(e) => {
                eprintln!("interpolate failed: {e}");
                std::process::exit(1);
            }
        }
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "interpolate: manifest {} lines, {} ops files ({} operations), output {} lines",
        text.lines().count(),
        OPS_FILES,
        ops_count,
        out.lines().count()
    );
    println!(
        "first run (generates 20 passwords, 2 certificates): {:.1} ms",
        ms(warmup)
    );
    println!(
        "{} runs: min {:.2} ms, median {:.2} ms, max {:.2} ms",
        RUNS,
        ms(times[0]),
        ms(times[RUNS / 2]),
        ms(times[RUNS - 1])
    );
}

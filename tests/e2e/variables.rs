//! Generated variables in a deploy: a certificate for the kv job's TLS,
//! generated once and kept (sealed in the state), never shown in the diff,
//! the deploy output, the events, `instances` or `variables`; rotated only
//! when asked.

use std::process::Command;

use crate::support::{kv_manifest, text, Env};

/// The certificate an instance serves (PEM), fetched without verification.
fn served_cert(ip: &str) -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            &format!("import ssl; print(ssl.get_server_certificate(('{ip}', 8080)))"),
        ])
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A line from the middle of a PEM body: if it shows up anywhere, the
/// secret (or the certificate) leaked.
fn pem_line(pem: &str) -> String {
    pem.lines().nth(2).expect("a PEM body").to_string()
}

fn manifest() -> String {
    kv_manifest("quickstart", 8080, "300-30000")
        .replace(
            "    properties:\n      kv:\n        port: 8080\n",
            "    properties:\n      kv:\n        port: 8080\n        tls:\n          certificate: ((kv_tls.certificate))\n          private_key: ((kv_tls.private_key))\n          ca: ((kv_tls.ca))\n",
        )
        + "variables:\n- name: kv_ca\n  type: certificate\n  options: {is_ca: true, common_name: kv-ca}\n- name: kv_tls\n  type: certificate\n  options: {ca: kv_ca, common_name: kv, alternative_names: [127.114.0.101, 127.114.0.102, 127.114.0.103]}\n"
}

#[test]
fn a_generated_certificate_is_kept_sealed_and_never_shown() {
    let env = Env::new(114);
    let m = env.manifest("m.yml", &manifest());
    let m = m.to_str().unwrap();
    let first = env.bosun(&["deploy", m, "-n"]);
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        text(&first).contains("+           certificate: ((kv_tls.certificate))"),
        "the diff shows placeholders: {}",
        text(&first)
    );

    let list = env.instances("quickstart");
    let ip = list[0]["ips"][0].as_str().unwrap().to_string();
    let cert = served_cert(&ip);
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
    let vars = env.bosun(&["-d", "quickstart", "variables", "--json"]);
    assert!(vars.status.success(), "{}", text(&vars));
    let listed: serde_json::Value = serde_json::from_slice(&vars.stdout).unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["kv_ca", "kv_tls"]);
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x["id"].as_str().unwrap().to_string())
            .collect()
    };

    // A redeploy changes nothing and rotates nothing.
    let second = env.bosun(&["deploy", m, "-n"]);
    assert!(text(&second).contains("no changes"), "{}", text(&second));
    assert_eq!(served_cert(&ip), cert, "not rotated");
    let again = env.bosun(&["-d", "quickstart", "variables", "--json"]);
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(ids(&again), ids(&listed));

    // The secret is nowhere to be seen: not in the deploy outputs (diff,
    // plan, progress), the events, instances, variables, nor in clear in
    // the state files.
    let events = env.bosun(&["-d", "quickstart", "events", "--json"]);
    let instances = env.bosun(&["-d", "quickstart", "instances", "--ps", "--json"]);
    let dry = env.bosun(&["deploy", m, "--dry-run"]);
    let needle = pem_line(&cert);
    for (what, out) in [
        ("first deploy", &first),
        ("second deploy", &second),
        ("dry run", &dry),
        ("events", &events),
        ("instances", &instances),
        ("variables", &vars),
    ] {
        let all = text(out);
        assert!(
            !all.contains("PRIVATE KEY"),
            "{what} shows a private key:\n{all}"
        );
        assert!(
            !all.contains("BEGIN CERTIFICATE"),
            "{what} shows a certificate:\n{all}"
        );
        assert!(
            !all.contains(&needle),
            "{what} shows the certificate:\n{all}"
        );
    }
    for f in ["state.db", "state.db-wal"] {
        let bytes = std::fs::read(env.state().join(f)).unwrap_or_default();
        let hay = String::from_utf8_lossy(&bytes);
        assert!(
            !hay.contains("PRIVATE KEY"),
            "{f} holds a private key in clear"
        );
        assert!(!hay.contains(&needle), "{f} holds the certificate in clear");
    }

    // Replication works over TLS between the instances (verified by the CA).
    let py = format!(
        "import ssl, urllib.request as u\nctx = ssl._create_unverified_context()\nu.urlopen(u.Request('https://{ip}:8080/kv/k', data=b'tls', method='PUT'), context=ctx)\nprint(u.urlopen('https://{}:8080/kv/k', context=ctx).read().decode())",
        list[2]["ips"][0].as_str().unwrap()
    );
    let out = Command::new("python3").args(["-c", &py]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "tls",
        "{}",
        text(&out)
    );

    // Rotation on request only.
    let rotated = env.bosun(&["deploy", m, "-n", "--regenerate", "kv_tls"]);
    assert!(rotated.status.success(), "{}", text(&rotated));
    assert_ne!(served_cert(&ip), cert, "regenerated");
    let after = env.bosun(&["-d", "quickstart", "variables", "--json"]);
    let after: serde_json::Value = serde_json::from_slice(&after.stdout).unwrap();
    assert_eq!(ids(&after)[0], ids(&listed)[0], "the CA is kept");
    assert_ne!(ids(&after)[1], ids(&listed)[1], "the leaf is new");
}

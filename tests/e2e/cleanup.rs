//! `clean-up`: unused release versions, stemcells, compiled packages and the
//! blobs only they reference go (the two newest unused versions stay unless
//! `--all`); what a deployment uses stays, and a later deploy still works.

use crate::support::{kv_manifest, repo, text, Env};

/// Files in the director's blob store.
fn blob_count(env: &Env) -> usize {
    std::fs::read_dir(env.state().join("blobs"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file() && !e.file_name().to_string_lossy().starts_with('.'))
        .count()
}

fn clean_up(env: &Env, all: bool) -> serde_json::Value {
    let mut args = vec!["clean-up", "-n", "--json"];
    if all {
        args.push("--all");
    }
    let out = env.bosun(&args);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

fn release_versions(env: &Env) -> Vec<String> {
    let out = env.bosun(&["releases", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{}/{}",
                r["name"].as_str().unwrap(),
                r["version"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn clean_up_deletes_what_no_deployment_uses_and_keeps_the_rest() {
    let env = Env::new(126);
    // Four versions of kv that differ in one job script.
    let rel = env.path("kv-release");
    let cp = std::process::Command::new("cp")
        .arg("-r")
        .arg(repo().join("releases/kv"))
        .arg(&rel)
        .status()
        .unwrap();
    assert!(cp.success());
    let drain = rel.join("jobs/kv/templates/drain");
    for v in 1..=4 {
        let mut script = std::fs::read_to_string(&drain).unwrap();
        script.push_str(&format!("# build {v}\n"));
        std::fs::write(&drain, script).unwrap();
        let out = env.bosun(&[
            "upload-release",
            rel.to_str().unwrap(),
            "--version",
            &v.to_string(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let m = env.manifest(
        "m.yml",
        &kv_manifest("quickstart", 8080, "300-30000")
            .replace("version: latest\n  path: {release}", "version: \"2\""),
    );
    let out = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let blobs = blob_count(&env);

    // Unused: 1, 3 and 4; the two newest of them stay.
    let done = clean_up(&env, false);
    assert_eq!(done["releases"], serde_json::json!(["kv/1"]), "{done}");
    assert_eq!(done["stemcells"], serde_json::json!([]), "{done}");
    assert_eq!(done["compiled_packages"], 0, "{done}");
    assert_eq!(done["blobs"], 1, "only v1's kv job differs: {done}");
    assert_eq!(blob_count(&env), blobs - 1);
    assert_eq!(release_versions(&env), ["kv/2", "kv/3", "kv/4"]);
    let out = env.bosun(&["clean-up", "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("Nothing to clean up"), "{}", text(&out));

    // --all: every unused version; the deployed one and its stemcell stay.
    let done = clean_up(&env, true);
    assert_eq!(
        done["releases"],
        serde_json::json!(["kv/3", "kv/4"]),
        "{done}"
    );
    assert_eq!(done["stemcells"], serde_json::json!([]), "{done}");
    assert_eq!(done["blobs"], 2, "{done}");
    assert_eq!(release_versions(&env), ["kv/2"]);
    let out = env.bosun(&["-d", "quickstart", "recreate", "kv/0", "-n"]);
    assert!(
        out.status.success(),
        "what it uses is intact: {}",
        text(&out)
    );

    // Without the deployment, everything goes: release, stemcell, compiled
    // packages, orphaned disks and every blob.
    let out = env.bosun(&["-d", "quickstart", "delete-deployment", "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let done = clean_up(&env, true);
    assert_eq!(done["releases"], serde_json::json!(["kv/2"]), "{done}");
    assert_eq!(done["stemcells"].as_array().unwrap().len(), 1, "{done}");
    assert_eq!(done["compiled_packages"], 2, "{done}");
    assert_eq!(
        done["orphaned_disks"].as_array().unwrap().len(),
        3,
        "{done}"
    );
    assert_eq!(done["problems"], serde_json::json!([]), "{done}");
    assert_eq!(blob_count(&env), 0);
    assert!(release_versions(&env).is_empty());

    // And a deploy starts from scratch again.
    let m = env.manifest("m2.yml", &kv_manifest("quickstart", 8080, "300-30000"));
    let out = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("2 compiled, 3 created"),
        "{}",
        text(&out)
    );
}

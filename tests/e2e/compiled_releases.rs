//! Compiled releases: `export-release` writes what a deploy compiled, and a
//! fresh director that uploads the export deploys it compiling nothing.

use std::io::Read;
use std::path::Path;

use crate::support::{http, kv_manifest, text, Env};

/// The entries of `compiled_packages/NAME.tgz` inside a release tarball.
fn compiled_entries(tarball: &Path, name: &str) -> Vec<String> {
    let f = std::fs::File::open(tarball).unwrap();
    let mut outer = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let want = format!("compiled_packages/{name}.tgz");
    for e in outer.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        if path.trim_start_matches("./") != want {
            continue;
        }
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        let mut inner = tar::Archive::new(flate2::read::GzDecoder::new(data.as_slice()));
        return inner
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let p = e.path().unwrap().to_string_lossy().into_owned();
                p.trim_start_matches("./").to_string()
            })
            .collect();
    }
    panic!("{want} not in {}", tarball.display());
}

fn one_instance(manifest: &str) -> String {
    manifest.replace("instances: 3", "instances: 1")
}

#[test]
fn an_exported_compiled_release_deploys_on_a_fresh_director_without_compiling() {
    let first = Env::new(170);
    let m = first.manifest(
        "m.yml",
        &one_instance(&kv_manifest("quickstart", 8080, "300-30000")),
    );
    let o = first.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("2 compiled"),
        "{}",
        text(&o)
    );

    let o = first.bosun(&["releases", "--json"]);
    let rels: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let version = rels[0]["version"].as_str().unwrap().to_string();
    let os = bosun_director::host_os();
    let o = first.bosun(&["stemcells", "--json"]);
    let cells: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let cell = cells
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["os"] == os.as_str())
        .unwrap_or_else(|| panic!("no {os} stemcell in {cells}"));
    let stemcell = format!("{os}/{}", cell["version"].as_str().unwrap());

    // A stemcell nothing was compiled for: refused, naming the packages.
    let out_dir = first.path("exports");
    std::fs::create_dir_all(&out_dir).unwrap();
    let release = format!("kv/{version}");
    let o = first.bosun(&[
        "export-release",
        &release,
        "other-os/7",
        "--dir",
        out_dir.to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("kv-common, kv-server"), "{err}");
    assert!(
        err.contains("deploy the release on that stemcell first"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&out_dir).unwrap().count(),
        0,
        "nothing written"
    );

    let o = first.bosun(&[
        "export-release",
        &release,
        &stemcell,
        "--dir",
        out_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let tarball = out_dir.join(format!("kv-{version}-{}.tgz", stemcell.replace('/', "-")));
    assert!(tarball.is_file(), "{}", text(&o));

    // BOSH's layout: release.MF lists the compiled packages for the
    // stemcell, each archive holds the package's install directory.
    let rel = bosun_director::release::read_release(&tarball, None).unwrap();
    assert!(rel.packages.is_empty());
    let names: Vec<_> = rel
        .compiled_packages
        .iter()
        .map(|c| (c.name.as_str(), c.stemcell.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("kv-common", stemcell.as_str()),
            ("kv-server", stemcell.as_str())
        ]
    );
    let server = rel
        .compiled_packages
        .iter()
        .find(|c| c.name == "kv-server")
        .unwrap();
    assert_eq!(server.dependencies, ["kv-common"]);
    assert_eq!(rel.jobs.len(), 2, "every job is exported");
    let entries = compiled_entries(&tarball, "kv-server");
    assert!(entries.iter().any(|e| e == "bin/kv-server"), "{entries:?}");
    assert!(entries.iter().any(|e| e == "lib/server.py"), "{entries:?}");

    let o = first.bosun(&["-d", "quickstart", "delete-deployment", "-n"]);
    assert!(o.status.success(), "{}", text(&o));

    // A fresh director: upload the export and deploy from it alone.
    let second = Env::new(171);
    let o = second.bosun(&["upload-release", tarball.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!(
            "Uploaded release {release} (2 packages compiled for {stemcell})"
        )),
        "{}",
        text(&o)
    );
    let body = one_instance(&kv_manifest("quickstart", 8080, "300-30000"))
        .replace("  path: {release}\n", "");
    assert!(!body.contains("path:"), "{body}");
    let m = second.manifest("m.yml", &body);
    let o = second.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("compiling"), "{out}");
    assert!(out.contains("0 compiled, 1 created"), "{out}");

    let list = second.instances("quickstart");
    let ip = list[0]["ips"][0].as_str().unwrap().to_string();
    let addr = format!("{ip}:8080");
    let (code, _) = http("PUT", &addr, "/kv/answer", "42").unwrap();
    assert!((200..300).contains(&code), "PUT answered {code}");
    let (code, body) = http("GET", &addr, "/kv/answer", "").unwrap();
    assert_eq!((code, body.trim()), (200, "42"));
}

#[test]
fn a_package_compiled_only_for_another_stemcell_fails_the_deploy_naming_both() {
    // A compiled release for a stemcell this director does not have, made
    // from an export of the kv release.
    let first = Env::new(172);
    let m = first.manifest(
        "m.yml",
        &one_instance(&kv_manifest("quickstart", 8080, "300-30000")),
    );
    let o = first.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = first.bosun(&["-d", "quickstart", "delete-deployment", "-n"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = first.bosun(&["releases", "--json"]);
    let rels: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let release = format!("kv/{}", rels[0]["version"].as_str().unwrap());
    let os = bosun_director::host_os();
    let o = first.bosun(&["stemcells", "--json"]);
    let cells: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let here = format!("{os}/{}", cells[0]["version"].as_str().unwrap());
    let o = first.bosun(&[
        "export-release",
        &release,
        &here,
        "--dir",
        first.path("").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let exported = std::fs::read_dir(first.path(""))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "tgz"))
        .unwrap();
    let mut rel = bosun_director::release::read_release(&exported, None).unwrap();
    for c in &mut rel.compiled_packages {
        c.stemcell = "elsewhere-os/7".into();
    }
    for c in &mut rel.manifest.compiled_packages {
        c.stemcell = "elsewhere-os/7".into();
    }
    let elsewhere = first.path("kv-elsewhere.tgz");
    bosun_director::release::write_tarball(&rel, &elsewhere).unwrap();

    let second = Env::new(173);
    let o = second.bosun(&["upload-release", elsewhere.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let body = one_instance(&kv_manifest("quickstart", 8080, "300-30000"))
        .replace("  path: {release}\n", "");
    let m = second.manifest("m.yml", &body);
    let o = second.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("package 'kv-common'"), "{err}");
    assert!(err.contains("compiled only for elsewhere-os/7"), "{err}");
    assert!(err.contains(&format!("stemcell {here} needs it")), "{err}");
    assert_eq!(second.vm_dirs(), 0, "no VM was created");
}

//! Generation into a vars store: each type, generated once and kept,
//! regeneration on changed definitions or on request, store format.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_yaml_ng::Value;
use x509_parser::prelude::*;

use super::{int_err, int_ok, y};
use crate::interpolate::store::DIGESTS_KEY;
use crate::interpolate::{interpolate_value, InterpolateOptions};

fn store_opts(path: &Path) -> InterpolateOptions {
    InterpolateOptions {
        vars_store: Some(path.to_path_buf()),
        ..InterpolateOptions::default()
    }
}

fn read_store(path: &Path) -> Value {
    y(&std::fs::read_to_string(path).unwrap())
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string '{key}' in {v:?}"))
}

/// Parse a PEM certificate and run `f` on it.
fn with_cert<T>(pem_text: &str, f: impl FnOnce(&X509Certificate<'_>) -> T) -> T {
    let (_, pem) = parse_x509_pem(pem_text.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    f(&cert)
}

const CERTS: &str = "
variables:
- name: ca
  type: certificate
  options:
    is_ca: true
    common_name: test-ca
- name: server
  type: certificate
  options:
    ca: ca
    common_name: server.example.com
    alternative_names: [server.example.com, '*.svc.local', 10.0.0.7]
    extended_key_usage: [server_auth, client_auth]
    duration: 30
tls:
  ca: ((server.ca))
  cert: ((server.certificate))
  key: ((server.private_key))
";

#[test]
fn password_is_20_lowercase_alphanumerics_and_stored_0600() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("creds.yml");
    let v = interpolate_value(
        "m.yml",
        "variables:\n- {name: pw, type: password}\npassword: ((pw))\n",
        &store_opts(&path),
    )
    .unwrap();
    let pw = s(&v, "password");
    assert_eq!(pw.len(), 20);
    assert!(
        pw.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{pw}"
    );
    assert_eq!(s(&read_store(&path), "pw"), pw);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn generated_values_are_kept_across_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("creds.yml");
    let manifest = "variables:\n- {name: pw, type: password}\n- {name: key, type: rsa}\na: ((pw))\nb: ((key.public_key))\n";
    let first = int_ok(manifest, &store_opts(&path));
    let store_after_first = std::fs::read_to_string(&path).unwrap();
    let second = int_ok(manifest, &store_opts(&path));
    assert_eq!(first, second);
    assert_eq!(store_after_first, std::fs::read_to_string(&path).unwrap());
    // Two runs with two different stores give different values.
    let other = int_ok(manifest, &store_opts(&dir.path().join("other.yml")));
    assert_ne!(first, other);
}

#[test]
fn store_file_keeps_values_under_names_and_digests_aside() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("creds.yml");
    int_ok(
        "variables:\n- {name: b_pw, type: password}\n- {name: a_pw, type: password}\n",
        &store_opts(&path),
    );
    let store = read_store(&path);
    let keys: Vec<&str> = store
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(keys, ["b_pw", "a_pw", DIGESTS_KEY]);
    let digests = store[DIGESTS_KEY].as_mapping().unwrap();
    assert_eq!(digests.len(), 2);
    assert_eq!(s(&store[DIGESTS_KEY], "a_pw").len(), 64);
}

#[test]
fn certificate_ca_and_leaf_signed_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("creds.yml");
    let v = interpolate_value("m.yml", CERTS, &store_opts(&path)).unwrap();
    let store = read_store(&path);
    let ca = &store["ca"];
    let tls = &v["tls"];
    // The leaf's `ca` is the CA's certificate; the CA's `ca` is itself.
    assert_eq!(s(tls, "ca"), s(ca, "certificate"));
    assert_eq!(s(ca, "ca"), s(ca, "certificate"));
    assert!(s(tls, "key").starts_with("-----BEGIN RSA PRIVATE KEY-----"));

    let (ca_subject, ca_spki) = with_cert(s(ca, "certificate"), |c| {
        assert!(c.is_ca());
        assert_eq!(c.subject(), c.issuer());
        let cn = c
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(cn, "test-ca");
        let ku = c.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        (c.subject().to_string(), c.public_key().raw.to_vec())
    });
    assert!(ca_subject.contains("O=Cloud Foundry"), "{ca_subject}");
    with_cert(s(tls, "cert"), |c| {
        assert!(!c.is_ca());
        assert_eq!(c.issuer().to_string(), ca_subject);
        let (_, spki) = SubjectPublicKeyInfo::from_der(&ca_spki).unwrap();
        c.verify_signature(Some(&spki))
            .expect("leaf is signed by the CA");
        let cn = c
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(cn, "server.example.com");
        let san = c.subject_alternative_name().unwrap().unwrap().value;
        let names: Vec<String> = san
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => d.to_string(),
                GeneralName::IPAddress(ip) => format!("ip:{ip:?}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            ["server.example.com", "*.svc.local", "ip:[10, 0, 0, 7]"]
        );
        let eku = c.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let ku = c.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        let days =
            (c.validity().not_after.timestamp() - c.validity().not_before.timestamp()) / 86400;
        assert_eq!(days, 30);
    });
}

#[test]
fn leaf_defaults_to_server_auth_and_365_days() {
    let dir = tempfile::tempdir().unwrap();
    let v = interpolate_value(
        "m.yml",
        "variables:\n- {name: ca, type: certificate, options: {is_ca: true}}\n- {name: c, type: certificate, options: {ca: ca}}\nc: ((c.certificate))\n",
        &store_opts(&dir.path().join("s.yml")),
    )
    .unwrap();
    with_cert(s(&v, "c"), |c| {
        let eku = c.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        let days =
            (c.validity().not_after.timestamp() - c.validity().not_before.timestamp()) / 86400;
        assert_eq!(days, 365);
    });
}

#[test]
fn intermediate_ca_is_signed_by_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.yml");
    let manifest = "
variables:
- {name: root, type: certificate, options: {is_ca: true, common_name: root}}
- {name: mid, type: certificate, options: {is_ca: true, ca: root, common_name: mid}}
- {name: leaf, type: certificate, options: {ca: mid, common_name: leaf}}
";
    interpolate_value("m.yml", manifest, &store_opts(&path)).unwrap();
    let store = read_store(&path);
    assert_eq!(s(&store["mid"], "ca"), s(&store["root"], "certificate"));
    assert_eq!(s(&store["leaf"], "ca"), s(&store["mid"], "certificate"));
    let root_spki = with_cert(s(&store["root"], "certificate"), |c| {
        c.public_key().raw.to_vec()
    });
    let mid_spki = with_cert(s(&store["mid"], "certificate"), |c| {
        assert!(c.is_ca());
        let (_, spki) = SubjectPublicKeyInfo::from_der(&root_spki).unwrap();
        c.verify_signature(Some(&spki))
            .expect("mid is signed by root");
        c.public_key().raw.to_vec()
    });
    with_cert(s(&store["leaf"], "certificate"), |c| {
        let (_, spki) = SubjectPublicKeyInfo::from_der(&mid_spki).unwrap();
        c.verify_signature(Some(&spki))
            .expect("leaf is signed by mid");
    });
}

#[test]
fn changed_certificate_options_regenerate_only_that_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.yml");
    interpolate_value("m.yml", CERTS, &store_opts(&path)).unwrap();
    let before = read_store(&path);
    let changed = CERTS.replace("duration: 30", "duration: 60");
    interpolate_value("m.yml", &changed, &store_opts(&path)).unwrap();
    let after = read_store(&path);
    assert_eq!(before["ca"], after["ca"]);
    assert_ne!(
        s(&before["server"], "certificate"),
        s(&after["server"], "certificate")
    );
    // And it stays put after that.
    interpolate_value("m.yml", &changed, &store_opts(&path)).unwrap();
    assert_eq!(after, read_store(&path));
}

#[test]
fn regenerating_a_ca_regenerates_the_certificates_it_signs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.yml");
    interpolate_value("m.yml", CERTS, &store_opts(&path)).unwrap();
    let before = read_store(&path);
    let opts = InterpolateOptions {
        regenerate: vec!["ca".to_string()],
        ..store_opts(&path)
    };
    interpolate_value("m.yml", CERTS, &opts).unwrap();
    let after = read_store(&path);
    assert_ne!(before["ca"], after["ca"]);
    assert_ne!(before["server"], after["server"]);
    assert_eq!(s(&after["server"], "ca"), s(&after["ca"], "certificate"));
}

#[test]
fn regenerate_names_one_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.yml");
    let manifest = "variables:\n- {name: a, type: password}\n- {name: b, type: password}\n";
    interpolate_value("m.yml", manifest, &store_opts(&path)).unwrap();
    let before = read_store(&path);
    let opts = InterpolateOptions {
        regenerate: vec!["a".to_string()],
        ..store_opts(&path)
    };
    interpolate_value("m.yml", manifest, &opts).unwrap();
    let after = read_store(&path);
    assert_ne!(before["a"], after["a"]);
    assert_eq!(before["b"], after["b"]);
    let opts = InterpolateOptions {
        regenerate: vec!["nope".to_string()],
        ..store_opts(&path)
    };
    assert_eq!(
        int_err(manifest, &opts),
        "cannot regenerate 'nope': it has no variable definition with a type"
    );
}

#[test]
fn ssh_key_parses_and_fingerprint_is_md5_of_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let v = interpolate_value(
        "m.yml",
        "variables:\n- {name: k, type: ssh}\nkey: ((k))\n",
        &store_opts(&dir.path().join("s.yml")),
    )
    .unwrap();
    let k = &v["key"];
    let private = bosun_agent::keys::parse_private_key(s(k, "private_key")).unwrap();
    let public = bosun_agent::keys::parse_public_key(s(k, "public_key")).unwrap();
    assert_eq!(private.public_key().key_data(), public.key_data());
    assert!(s(k, "public_key").starts_with("ssh-ed25519 "));
    let fp = s(k, "public_key_fingerprint");
    assert_eq!(fp.len(), 47);
    let blob = s(k, "public_key").split(' ').nth(1).unwrap();
    assert_eq!(
        fp,
        crate::interpolate::generate::md5_fingerprint(blob).unwrap()
    );
}

#[test]
fn rsa_key_parses_and_halves_match() {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::pkcs8::DecodePublicKey;
    use rsa::traits::PublicKeyParts;
    let dir = tempfile::tempdir().unwrap();
    let v = interpolate_value(
        "m.yml",
        "variables:\n- {name: k, type: rsa}\nkey: ((k))\n",
        &store_opts(&dir.path().join("s.yml")),
    )
    .unwrap();
    let private = rsa::PrivateKey::from_pkcs1_pem(s(&v["key"], "private_key")).unwrap();
    let public = rsa::PublicKey::from_public_key_pem(s(&v["key"], "public_key")).unwrap();
    assert_eq!(&private.to_public_key(), &public);
    assert_eq!(public.size() * 8, 2048);
}

#[test]
fn entries_written_by_bosh_are_kept_and_adopt_a_digest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.yml");
    std::fs::write(&path, "pw: from-bosh\nunrelated: x\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = int_ok(
        "variables:\n- {name: pw, type: password}\np: ((pw))\nu: ((unrelated))\n",
        &store_opts(&path),
    );
    assert_eq!(out, "variables: []\np: from-bosh\nu: x\n");
    let store = read_store(&path);
    assert_eq!(s(&store, "pw"), "from-bosh");
    assert!(store[DIGESTS_KEY].get("pw").is_some());
    // Rewritten atomically with mode 0600, whatever the old file's mode was.
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn options_are_interpolated_and_their_change_regenerates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.yml");
    let manifest = "
variables:
- {name: ca, type: certificate, options: {is_ca: true, common_name: ca}}
- {name: c, type: certificate, options: {ca: ca, common_name: ((domain))}}
cert: ((c.certificate))
";
    let cn = |domain: &str| {
        let opts = InterpolateOptions {
            vars: vec![("domain".to_string(), domain.to_string())],
            ..store_opts(&path)
        };
        let v = interpolate_value("m.yml", manifest, &opts).unwrap();
        with_cert(s(&v, "cert"), |c| {
            c.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
    };
    assert_eq!(cn("one.example"), "one.example");
    assert_eq!(cn("two.example"), "two.example");
}

#[test]
fn options_with_missing_variables_leave_the_variable_missing() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = "
variables:
- {name: ca, type: certificate, options: {is_ca: true, common_name: ((who))}}
c: ((ca.certificate))
";
    let opts = InterpolateOptions {
        var_errs: true,
        ..store_opts(&dir.path().join("s.yml"))
    };
    assert_eq!(
        int_err(manifest, &opts),
        "manifest.yml: Expected to find variables:\n  - ca\n  - who"
    );
}

#[test]
fn ca_can_come_from_a_vars_file() {
    let dir = tempfile::tempdir().unwrap();
    let gen_path = dir.path().join("gen.yml");
    interpolate_value(
        "m.yml",
        "variables:\n- {name: my_ca, type: certificate, options: {is_ca: true, common_name: ext}}\n",
        &store_opts(&gen_path),
    )
    .unwrap();
    let ca_yaml = std::fs::read_to_string(&gen_path).unwrap();
    let opts = InterpolateOptions {
        var_files: vec![("ca.yml".to_string(), ca_yaml)],
        ..store_opts(&dir.path().join("s.yml"))
    };
    let v = interpolate_value(
        "m.yml",
        "variables:\n- {name: c, type: certificate, options: {ca: my_ca, common_name: leaf}}\nc: ((c.certificate))\n",
        &opts,
    )
    .unwrap();
    with_cert(s(&v, "c"), |c| {
        let issuer_cn = c
            .issuer()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(issuer_cn, "ext");
    });
}

#[test]
fn certificate_errors() {
    let dir = tempfile::tempdir().unwrap();
    let opts = store_opts(&dir.path().join("s.yml"));
    assert_eq!(
        int_err("variables:\n- {name: c, type: certificate, options: {common_name: x}}\n", &opts),
        "variable 'c' (type certificate): Missing required CA name: a certificate that is not a CA (is_ca: true) needs 'ca', the name of the certificate variable that signs it"
    );
    assert_eq!(
        int_err("variables:\n- {name: c, type: certificate, options: {ca: nope}}\n", &opts),
        "variable 'c': certificate authority 'nope' not found (define it in variables or provide it)"
    );
    assert_eq!(
        int_err(
            "variables:\n- {name: c, type: certificate, options: {ca: c}}\n",
            &opts
        ),
        "Detected recursion in variable definitions: c -> c"
    );
    assert_eq!(
        int_err(
            "variables:\n- {name: ca, type: certificate, options: {is_ca: true}}\n- {name: c, type: certificate, options: {ca: ca, extended_key_usage: [code_signing]}}\n",
            &opts
        ),
        "variable 'c' (type certificate): Unsupported extended key usage value: code_signing (supported: server_auth, client_auth)"
    );
    assert_eq!(
        int_err("variables:\n- {name: u, type: user}\n", &opts),
        "variable 'u' (type user): unsupported variable type 'user' (supported: password, certificate, ssh, rsa)"
    );
}

#[test]
fn provided_values_are_not_generated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.yml");
    let opts = InterpolateOptions {
        vars: vec![("pw".to_string(), "given".to_string())],
        ..store_opts(&path)
    };
    let out = int_ok(
        "variables:\n- {name: pw, type: password}\np: ((pw))\n",
        &opts,
    );
    assert_eq!(out, "variables: []\np: given\n");
    assert!(!path.exists());
}

#[test]
fn typed_definitions_without_a_store_are_missing() {
    let opts = InterpolateOptions {
        var_errs: true,
        ..InterpolateOptions::default()
    };
    assert_eq!(
        int_err(
            "variables:\n- {name: pw, type: password}\n- {name: plain}\n",
            &opts
        ),
        "manifest.yml: Expected to find variables:\n  - plain\n  - pw"
    );
    let out = int_ok(
        "variables:\n- {name: pw, type: password}\na: ((pw))\n",
        &InterpolateOptions::default(),
    );
    assert_eq!(out, "variables:\n- name: pw\n  type: password\na: ((pw))\n");
}

#[test]
fn a_certificate_whose_ca_is_missing_is_missing_too() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = "
variables:
- {name: ca, type: certificate, options: {is_ca: true, common_name: ((org))}}
- {name: leaf, type: certificate, options: {ca: ca, common_name: leaf}}
c: ((leaf.certificate))
";
    let opts = InterpolateOptions {
        var_errs: true,
        ..store_opts(&dir.path().join("s.yml"))
    };
    assert_eq!(
        int_err(manifest, &opts),
        "manifest.yml: Expected to find variables:\n  - ca\n  - leaf\n  - org"
    );
    // Without var_errs the placeholders stay and nothing is generated.
    let out = int_ok(manifest, &store_opts(&dir.path().join("s.yml")));
    assert!(out.contains("c: ((leaf.certificate))"), "{out}");
    assert!(!dir.path().join("s.yml").exists());
}

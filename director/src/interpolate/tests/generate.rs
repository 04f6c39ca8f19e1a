//! Generation into a vars store: each type, generated once and kept,
//! regeneration on changed definitions or on request, store format.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_yaml_ng::Value;
use x509_parser::prelude::*;

use super::{int_err, int_ok, y};
use crate::interpolate::store::{DIGESTS_KEY, DIGESTS_SUFFIX};
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

fn digests_of(store: &Path) -> Value {
    let mut name = store.as_os_str().to_os_string();
    name.push(DIGESTS_SUFFIX);
    read_store(Path::new(&name))
}

fn side_file(store: &Path) -> std::path::PathBuf {
    let mut name = store.as_os_str().to_os_string();
    name.push(DIGESTS_SUFFIX);
    name.into()
}

/// Set a file's mtime to a fixed past time, so that any rewrite shows.
fn age(path: &Path) -> std::time::SystemTime {
    let past = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_500_000_000);
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(past)
        .unwrap();
    past
}

fn mtime(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
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
fn store_file_holds_only_the_values_and_digests_go_to_a_side_file() {
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
    // Only the variables, as bosh-cli writes it; the digests are aside.
    assert_eq!(keys, ["b_pw", "a_pw"]);
    let digests = digests_of(&path);
    assert_eq!(digests.as_mapping().unwrap().len(), 2);
    assert_eq!(s(&digests, "a_pw").len(), 64);
    let mode = std::fs::metadata(side_file(&path))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
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

/// The key of a certificate value, checked against its certificate.
fn cert_key_bits(value: &Value) -> usize {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::pkcs8::DecodePublicKey;
    use rsa::traits::PublicKeyParts;
    let private = rsa::PrivateKey::from_pkcs1_pem(s(value, "private_key")).unwrap();
    let spki = with_cert(s(value, "certificate"), |c| c.public_key().raw.to_vec());
    let public = rsa::PublicKey::from_public_key_der(&spki).unwrap();
    assert_eq!(
        &private.to_public_key(),
        &public,
        "the key is the certificate's"
    );
    public.size() * 8
}

#[test]
fn certificates_get_bosh_cli_subjects_and_rsa_3072_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.yml");
    let manifest = "
variables:
- {name: ca, type: certificate, options: {is_ca: true, common_name: test-ca}}
- {name: leaf, type: certificate, options: {ca: ca, common_name: leaf.example, organization: Acme}}
";
    interpolate_value("m.yml", manifest, &store_opts(&path)).unwrap();
    let store = read_store(&path);
    with_cert(s(&store["ca"], "certificate"), |c| {
        assert_eq!(c.subject().to_string(), "C=US, O=Cloud Foundry, CN=test-ca");
        // Each attribute a PrintableString (tag 19), as Go encodes them.
        for attr in c.subject().iter_attributes() {
            assert_eq!(attr.attr_value().header.tag().0, 19, "{attr:?}");
        }
    });
    with_cert(s(&store["leaf"], "certificate"), |c| {
        assert_eq!(c.subject().to_string(), "C=US, O=Acme, CN=leaf.example");
        assert_eq!(c.issuer().to_string(), "C=US, O=Cloud Foundry, CN=test-ca");
        // The common name is not added to the SANs.
        assert!(c.subject_alternative_name().unwrap().is_none());
    });
    assert_eq!(cert_key_bits(&store["ca"]), 3072);
    assert_eq!(cert_key_bits(&store["leaf"]), 3072);
}

#[test]
fn certificate_key_length_option() {
    let dir = tempfile::tempdir().unwrap();
    let opts = store_opts(&dir.path().join("s.yml"));
    let v = interpolate_value(
        "m.yml",
        "variables:\n- {name: ca, type: certificate, options: {is_ca: true, key_length: 2048}}\nc: ((ca))\n",
        &opts,
    )
    .unwrap();
    assert_eq!(cert_key_bits(&v["c"]), 2048);
    assert_eq!(
        int_err("variables:\n- {name: x, type: certificate, options: {is_ca: true, key_length: 1024}}\n", &opts),
        "variable 'x' (type certificate): option 'key_length': 1024 is not a supported key length (supported: 2048, 3072, 4096)"
    );
}

#[test]
fn certificate_options_bosh_cli_does_not_know_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let opts = store_opts(&dir.path().join("s.yml"));
    assert_eq!(
        int_err(
            "variables:\n- {name: x, type: certificate, options: {is_ca: true, alternate_names: [a]}}\n",
            &opts
        ),
        "variable 'x' (type certificate): unsupported option 'alternate_names' (supported: common_name, organization, alternative_names, is_ca, ca, extended_key_usage, duration, key_length)"
    );
    assert!(!dir.path().join("s.yml").exists());
}

#[test]
fn sans_are_dns_names_then_ip_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = "
variables:
- {name: ca, type: certificate, options: {is_ca: true, key_length: 2048}}
- name: c
  type: certificate
  options:
    ca: ca
    key_length: 2048
    common_name: b.example
    alternative_names: [10.0.0.7, b.example, '2001:db8::1', a.example, 127.0.0.1]
c: ((c.certificate))
";
    let v = interpolate_value("m.yml", manifest, &store_opts(&dir.path().join("s.yml"))).unwrap();
    with_cert(s(&v, "c"), |c| {
        let san = c.subject_alternative_name().unwrap().unwrap().value;
        let names: Vec<String> = san
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => format!("dns:{d}"),
                GeneralName::IPAddress(ip) => match ip.len() {
                    4 => format!(
                        "ip:{}",
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).unwrap())
                    ),
                    _ => format!(
                        "ip:{}",
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).unwrap())
                    ),
                },
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            [
                "dns:b.example",
                "dns:a.example",
                "ip:10.0.0.7",
                "ip:2001:db8::1",
                "ip:127.0.0.1"
            ]
        );
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
fn ssh_key_is_rsa_2048_as_bosh_cli_makes_it() {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::traits::PublicKeyParts;
    let dir = tempfile::tempdir().unwrap();
    let v = interpolate_value(
        "m.yml",
        "variables:\n- {name: k, type: ssh}\nkey: ((k))\n",
        &store_opts(&dir.path().join("s.yml")),
    )
    .unwrap();
    let k = &v["key"];
    let private_pem = s(k, "private_key");
    assert!(
        private_pem.starts_with("-----BEGIN RSA PRIVATE KEY-----\n"),
        "{private_pem}"
    );
    let private = rsa::PrivateKey::from_pkcs1_pem(private_pem).unwrap();
    assert_eq!(private.size() * 8, 2048);

    // An authorized_keys line, with its newline, as bosh-cli gives it.
    let line = s(k, "public_key");
    assert!(line.starts_with("ssh-rsa AAAA"), "{line}");
    assert!(
        line.ends_with('\n') && !line.trim_end().contains('\n'),
        "{line:?}"
    );
    let public = bosun_agent::keys::parse_public_key(line).unwrap();
    let rsa_pub = public.key_data().rsa().expect("an RSA public key");
    assert_eq!(
        rsa_pub.n().as_positive_bytes().unwrap(),
        &*private.n_bytes(),
        "the public key is the private key's"
    );
    assert_eq!(
        rsa_pub.e().as_positive_bytes().unwrap(),
        &*private.e_bytes()
    );

    // MD5 of the key blob, 16 lowercase hex pairs joined by ':'.
    let blob = public.to_bytes().unwrap();
    let expected: Vec<String> = md5::compute(&blob)
        .0
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(s(k, "public_key_fingerprint"), expected.join(":"));
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
fn a_store_bosh_made_is_left_untouched_when_nothing_is_generated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.yml");
    let bosh_store = "pw: from-bosh\nunrelated: x\n";
    std::fs::write(&path, bosh_store).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let written = age(&path);
    let manifest = "variables:\n- {name: pw, type: password}\np: ((pw))\nu: ((unrelated))\n";
    let out = int_ok(manifest, &store_opts(&path));
    assert_eq!(out, "variables: []\np: from-bosh\nu: x\n");
    // Byte for byte, same mtime, same mode.
    assert_eq!(std::fs::read_to_string(&path).unwrap(), bosh_store);
    assert_eq!(mtime(&path), written);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
    // The value adopted the definition's digest, in the side file.
    assert_eq!(s(&digests_of(&path), "pw").len(), 64);
    let side_written = age(&side_file(&path));

    // A second run changes nothing at all.
    assert_eq!(int_ok(manifest, &store_opts(&path)), out);
    assert_eq!(mtime(&path), written);
    assert_eq!(mtime(&side_file(&path)), side_written);

    // A changed definition now regenerates the adopted value.
    let longer = manifest.replace("type: password}", "type: password, options: {length: 30}}");
    int_ok(&longer, &store_opts(&path));
    let store = read_store(&path);
    assert_eq!(s(&store, "pw").len(), 30);
    assert_eq!(s(&store, "unrelated"), "x");
    let keys: Vec<&str> = store
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(keys, ["pw", "unrelated"]);
    // Rewritten atomically with mode 0600, whatever the old file's mode was.
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn a_store_bosun_made_is_left_untouched_on_later_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.yml");
    let manifest = "variables:\n- {name: pw, type: password}\n- {name: k, type: rsa}\na: ((pw))\n";
    int_ok(manifest, &store_opts(&path));
    let bytes = std::fs::read(&path).unwrap();
    let side_bytes = std::fs::read(side_file(&path)).unwrap();
    let written = age(&path);
    let side_written = age(&side_file(&path));
    int_ok(manifest, &store_opts(&path));
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(std::fs::read(side_file(&path)).unwrap(), side_bytes);
    assert_eq!(mtime(&path), written);
    assert_eq!(mtime(&side_file(&path)), side_written);
}

#[test]
fn losing_the_digests_file_loses_no_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.yml");
    let manifest = "variables:\n- {name: pw, type: password}\na: ((pw))\n";
    let first = int_ok(manifest, &store_opts(&path));
    std::fs::remove_file(side_file(&path)).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(int_ok(manifest, &store_opts(&path)), first);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert!(side_file(&path).exists(), "the digest is adopted again");
}

#[test]
fn digests_kept_in_the_store_by_earlier_versions_move_to_the_side_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.yml");
    let manifest = "variables:\n- {name: pw, type: password}\na: ((pw))\n";
    let digest = crate::interpolate::vars::definition_digest("password", &Value::Null, None);
    let old = format!("pw: kept\n{DIGESTS_KEY}:\n  pw: {digest}\n");
    std::fs::write(&path, &old).unwrap();
    let written = age(&path);
    // Nothing to generate: the file stays as it is, nothing is adopted.
    assert_eq!(
        int_ok(manifest, &store_opts(&path)),
        "variables: []\na: kept\n"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), old);
    assert_eq!(mtime(&path), written);
    assert!(!side_file(&path).exists());
    // The next write drops the key; its digests move aside.
    let more =
        "variables:\n- {name: pw, type: password}\n- {name: other, type: password}\na: ((pw))\n";
    int_ok(more, &store_opts(&path));
    let store = read_store(&path);
    assert_eq!(s(&store, "pw"), "kept");
    assert!(store.get(DIGESTS_KEY).is_none(), "{store:?}");
    let digests = digests_of(&path);
    assert_eq!(s(&digests, "pw"), digest);
    assert_eq!(s(&digests, "other").len(), 64);
}

#[test]
fn a_bad_digests_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.yml");
    std::fs::write(side_file(&path), "pw: [1]\n").unwrap();
    let err = int_err("a: 1\n", &store_opts(&path));
    assert_eq!(
        err,
        format!(
            "vars store {}: 'pw': expected a digest (a string) but found an array",
            side_file(&path).display()
        )
    );
}

#[test]
fn password_length_option() {
    let dir = tempfile::tempdir().unwrap();
    let opts = store_opts(&dir.path().join("s.yml"));
    let v = interpolate_value(
        "m.yml",
        "variables:\n- {name: a, type: password, options: {length: 32}}\n- {name: b, type: password, options: {length: 0}}\nx: ((a))\ny: ((b))\n",
        &opts,
    )
    .unwrap();
    assert_eq!(s(&v, "x").len(), 32);
    assert_eq!(s(&v, "y").len(), 20);
    assert_eq!(
        int_err("variables:\n- {name: c, type: password, options: {length: -1}}\n", &opts),
        "variable 'c' (type password): option 'length': expected a number of characters from 1 to 65536 but found -1"
    );
    assert_eq!(
        int_err(
            "variables:\n- {name: c, type: password, options: {size: 3}}\n",
            &opts
        ),
        "variable 'c' (type password): unsupported option 'size' (supported: length)"
    );
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

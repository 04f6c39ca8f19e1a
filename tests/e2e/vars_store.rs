//! `bosun interpolate --vars-store` against a store bosh-cli made: read
//! without a write when every value is there, extended with values shaped
//! as bosh-cli makes them, and never given keys of bosun's own.

use std::time::{Duration, SystemTime};

use crate::support::{text, Env};

fn mtime(path: &std::path::Path) -> SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

#[test]
fn a_bosh_vars_store_is_read_untouched_and_extended_with_bosh_shaped_values() {
    let env = Env::new(145);
    let store = env.path("creds.yml");
    let bosh_made = "admin_password: made-by-bosh\n";
    std::fs::write(&store, bosh_made).unwrap();
    let past = SystemTime::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    std::fs::File::options()
        .write(true)
        .open(&store)
        .unwrap()
        .set_modified(past)
        .unwrap();
    let m = env.path("m.yml");
    std::fs::write(
        &m,
        "variables:\n- {name: admin_password, type: password}\npassword: ((admin_password))\n",
    )
    .unwrap();
    let (m, s) = (m.to_str().unwrap(), store.to_str().unwrap());

    let out = env.bosun(&["interpolate", m, "--vars-store", s]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("password: made-by-bosh"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(&store).unwrap(), bosh_made);
    assert_eq!(mtime(&store), past, "the store was rewritten");

    // A new ssh variable: generated as bosh-cli does, the store keeps
    // only variables.
    std::fs::write(
        m,
        "variables:\n- {name: admin_password, type: password}\n- {name: host_key, type: ssh}\nkey: ((host_key.public_key))\n",
    )
    .unwrap();
    let out = env.bosun(&["interpolate", m, "--vars-store", s]);
    assert!(out.status.success(), "{}", text(&out));
    let written = std::fs::read_to_string(&store).unwrap();
    let names: Vec<&str> = written
        .lines()
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| l.split(':').next())
        .collect();
    assert_eq!(names, ["admin_password", "host_key"], "{written}");
    let field = |path: &str| {
        let out = env.bosun(&["interpolate", s, "--path", path]);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(field("/admin_password").trim(), "made-by-bosh");
    assert!(field("/host_key/private_key").starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    assert!(field("/host_key/public_key").starts_with("ssh-rsa AAAA"));
    assert_eq!(field("/host_key/public_key_fingerprint").trim().len(), 47);
    assert!(env.path("creds.yml.bosun-digests").exists());
}

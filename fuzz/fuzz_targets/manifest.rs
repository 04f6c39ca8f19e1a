//! Deployment manifests: `manifest::parse_manifest`, then, for one that
//! parses, `validate_manifest` against the local CPI's
//! default cloud-config. Every error is rendered as an operator sees it.
#![no_main]

use std::path::Path;

use bosun_director::model::{cloud_config, manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match manifest::parse_manifest("fuzz.yml", text, Path::new("/nonexistent/bosun-fuzz")) {
        Ok(m) => {
            if let Err(problems) =
                bosun_director::validate_manifest(&m, &cloud_config::default_local())
            {
                let _shown = problems.to_string();
            }
        }
        Err(problems) => {
            let _shown = problems.to_string();
        }
    }
});

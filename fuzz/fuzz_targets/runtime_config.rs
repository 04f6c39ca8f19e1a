//! Runtime-configs (releases and addons): `addons::parse_runtime_config`.
//! Every error is rendered as an operator sees it.
#![no_main]

use std::path::Path;

use bosun_director::model::addons;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(problems) = addons::parse_runtime_config(
        "runtime-config.yml",
        text,
        Path::new("/nonexistent/bosun-fuzz"),
    ) {
        let _shown = problems.to_string();
    }
});

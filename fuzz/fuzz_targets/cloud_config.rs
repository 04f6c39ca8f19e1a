//! Cloud-configs: `cloud_config::parse_cloud_config`. Every error is
//! rendered as an operator sees it.
#![no_main]

use bosun_director::model::cloud_config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(problems) = cloud_config::parse_cloud_config("cloud-config.yml", text) {
        let _shown = problems.to_string();
    }
});

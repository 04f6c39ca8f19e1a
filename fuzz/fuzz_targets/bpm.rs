//! A job's `config/bpm.yml`, parsed as the agent parses it before starting
//! the job's processes (`protocol::BpmConfig` through serde_yaml_ng).
#![no_main]

use bosun_agent::protocol::BpmConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = serde_yaml_ng::from_str::<BpmConfig>(text) {
        let _shown = e.to_string();
    }
});

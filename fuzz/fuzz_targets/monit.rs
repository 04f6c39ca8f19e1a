//! A job's rendered `monit` file, parsed as the agent parses it before
//! deciding which processes run (`monit::parse`, then the job's processes
//! from it, with an empty `bpm.yml`).
#![no_main]

use std::path::Path;

use bosun_agent::monit;
use bosun_agent::protocol::BpmConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("/var/vcap/jobs/fuzz/monit");
    match monit::parse(file, text) {
        Ok(parsed) => {
            let bpm = BpmConfig::default();
            if let Err(e) = monit::job_processes(file, "fuzz", &parsed, Some(&bpm)) {
                let _shown = e.to_string();
            }
        }
        Err(e) => {
            let _shown = e.to_string();
        }
    }
});

//! A release's job and package specs (`jobs/<name>/spec`,
//! `packages/<name>/spec`, and `job.MF` in tarballs):
//! `release::parse_job_spec` and `release::parse_package_spec`, both on
//! every input.
#![no_main]

use bosun_director::release;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = release::parse_job_spec("jobs/fuzz/spec", text) {
        let _shown = e.to_string();
    }
    if let Err(e) = release::parse_package_spec("packages/fuzz/spec", text) {
        let _shown = e.to_string();
    }
});

//! Stemcell tarballs: the input is written to a file and opened by
//! `stemcell::open_stemcell_with_limits` (the reader `bosun
//! upload-stemcell` uses), within small archive limits.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use bosun_director::archive_limits::ArchiveLimits;
use bosun_director::stemcell;
use libfuzzer_sys::fuzz_target;

/// A scratch directory for this fuzzing process, under `TMPDIR` (which
/// `scripts/fuzz` points at a directory it removes).
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("bosun-fuzz-stemcell-")
            .tempdir()
            .expect("creating the fuzzer's scratch directory");
        dir.keep()
    })
}

const LIMITS: ArchiveLimits = ArchiveLimits {
    max_size: 16 << 20,
    max_entries: 1000,
};

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    let tarball = dir.join("stemcell.tgz");
    std::fs::write(&tarball, data).expect("writing the fuzz input");
    match stemcell::open_stemcell_with_limits(&tarball, &LIMITS, Some(&dir.join("unpack"))) {
        Ok(opened) => {
            let _spec = opened.spec();
        }
        Err(e) => {
            let _shown = e.to_string();
        }
    }
});

//! `bosun interpolate`: a manifest, an ops file and a vars file, split out
//! of one input at the lines `#== ops ==` and `#== vars ==` (each part
//! optional), through `interpolate::interpolate_value_with` and
//! `interpolate::to_output`. No vars store: nothing is generated, so every
//! execution is pure parsing, patching and substitution.
#![no_main]

use bosun_director::interpolate::{self, InterpolateOptions};
use libfuzzer_sys::fuzz_target;

const OPS: &str = "\n#== ops ==\n";
const VARS: &str = "\n#== vars ==\n";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (rest, vars) = match text.split_once(VARS) {
        Some((rest, vars)) => (rest, Some(vars)),
        None => (text, None),
    };
    let (manifest, ops) = match rest.split_once(OPS) {
        Some((manifest, ops)) => (manifest, Some(ops)),
        None => (rest, None),
    };
    let opts = InterpolateOptions {
        ops_files: ops
            .map(|o| vec![("ops.yml".to_string(), o.to_string())])
            .unwrap_or_default(),
        var_files: vars
            .map(|v| vec![("vars.yml".to_string(), v.to_string())])
            .unwrap_or_default(),
        // The first byte chooses the flags, so both ways are explored.
        var_errs: data.first().is_some_and(|b| b & 1 == 1),
        ..InterpolateOptions::default()
    };
    match interpolate::interpolate_value_with("manifest.yml", manifest, &opts, None, &[]) {
        Ok(value) => {
            if let Err(e) = interpolate::to_output(&value, false) {
                let _shown = e.to_string();
            }
        }
        Err(e) => {
            let _shown = e.to_string();
        }
    }
});

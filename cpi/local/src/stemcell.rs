//! Stemcells of the local CPI: the host itself is the image, so a stemcell
//! is only its recorded spec (`stemcells/<cid>.json`).
//!
//! This module must not touch VMs or disks.

use bosun_cpi::{StemcellCid, StemcellSpec};

use crate::files::{remove_file_if_exists, valid_cid, write_json};
use crate::{Inner, Result};

impl Inner {
    pub(crate) fn create_stemcell(&self, spec: &StemcellSpec) -> Result<StemcellCid> {
        let cid = StemcellCid(format!("stemcell-{}", uuid::Uuid::new_v4()));
        write_json(&self.stemcell_file(&cid), spec, 0o644)?;
        Ok(cid)
    }

    pub(crate) fn delete_stemcell(&self, cid: &StemcellCid) -> Result<()> {
        if !valid_cid(&cid.0) {
            return Ok(());
        }
        remove_file_if_exists(&self.stemcell_file(cid))
    }
}

//! Uploads: releases, stemcells (and the local one built on demand),
//! cloud-configs and runtime-configs, checked before they are stored.
//!
//! This module must not print or read the terminal.

use super::*;

impl Director {
    /// Validate and store a runtime-config (addons for every deployment).
    pub fn update_runtime_config(&self, path: &Path) -> Result<i64, OpError> {
        let text = read(path)?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = std::fs::canonicalize(&base).unwrap_or(base);
        crate::model::addons::parse_runtime_config(&path.display().to_string(), &text, &base)?;
        Ok(self.store.save_runtime_config(&text, &base)?)
    }

    pub fn update_cloud_config(&self, path: &Path) -> Result<i64, OpError> {
        let text = read(path)?;
        cloud_config::parse_cloud_config(&path.display().to_string(), &text)?;
        Ok(self.store.save_cloud_config(&text)?)
    }

    /// Register the host as the local CPI's stemcell when a local CPI is
    /// configured and has none. Returns the record staged, or (with
    /// `persist` false, a dry run) the one that would be, its cid not yet
    /// known; `None` when there was nothing to do.
    pub async fn ensure_local_stemcell(
        &self,
        persist: bool,
    ) -> Result<Option<StemcellRecord>, OpError> {
        let Ok(cpi) = self.cpis.get("local") else {
            return Ok(None);
        };
        if self.store.stemcells()?.iter().any(|s| s.cpi == "local") {
            return Ok(None);
        }
        let spec = StemcellSpec {
            name: "bosun-local-host".into(),
            os: host_os(),
            version: "1".into(),
            image_path: None,
            cloud_properties: serde_json::json!({}),
        };
        let mut rec = StemcellRecord {
            name: spec.name.clone(),
            os: spec.os.clone(),
            version: spec.version.clone(),
            cpi: "local".into(),
            cid: "(registered on deploy)".into(),
        };
        if !persist {
            return Ok(Some(rec));
        }
        let cid = cpi.create_stemcell(&spec).await.map_err(|e| {
            OpError::Stemcell(format!(
                "registering the local stemcell: {e}",
                e = Chain(&e)
            ))
        })?;
        rec.cid = cid.0;
        self.store.save_stemcell(&rec)?;
        Ok(Some(rec))
    }

    /// Upload a stemcell tarball to every configured CPI that takes its
    /// format. Returns the records (existing ones included).
    pub async fn upload_stemcell(
        &self,
        path: &Path,
    ) -> Result<Vec<(StemcellRecord, bool)>, OpError> {
        let scratch = self.store.dir().join("tmp");
        let opened = crate::stemcell::open_stemcell_in(path, Some(&scratch)).map_err(|e| {
            OpError::Stemcell(format!(
                "reading stemcell {}: {e}",
                path.display(),
                e = Chain(&e)
            ))
        })?;
        let m = &opened.manifest;
        let existing = self.store.stemcells()?;
        let mut out = Vec::new();
        for name in self.cpis.names().map(str::to_string).collect::<Vec<_>>() {
            let cpi = self.cpis.get(&name)?;
            let info = cpi.info().await.map_err(|e| {
                OpError::Stemcell(format!(
                    "asking the {name} CPI for its formats: {e}",
                    e = Chain(&e)
                ))
            })?;
            if !info
                .stemcell_formats
                .iter()
                .any(|f| m.stemcell_formats.contains(f))
            {
                continue;
            }
            if let Some(rec) = existing
                .iter()
                .find(|s| s.cpi == name && s.name == m.name && s.version == m.version)
            {
                out.push((rec.clone(), false));
                continue;
            }
            let cid = cpi.create_stemcell(&opened.spec()).await.map_err(|e| {
                OpError::Stemcell(format!(
                    "uploading stemcell {}/{} to the {name} CPI: {e}",
                    m.name,
                    m.version,
                    e = Chain(&e)
                ))
            })?;
            let rec = StemcellRecord {
                name: m.name.clone(),
                os: m.operating_system.clone(),
                version: m.version.clone(),
                cpi: name.clone(),
                cid: cid.0,
            };
            self.store.save_stemcell(&rec)?;
            out.push((rec, true));
        }
        if out.is_empty() {
            return Err(OpError::Stemcell(format!(
                "no configured CPI takes stemcell format {} (configured: {}); the docker CPI is configured when Docker is reachable",
                m.stemcell_formats.join(", "),
                self.cpis.names().collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(out)
    }

    /// Read a release (directory or tarball) and upload it. Returns the
    /// record, whether it was new, and what the reader warned about (spec
    /// keys BOSH ignores, fingerprints it could not reproduce). A compiled
    /// release's compiled packages are stored as the cache of packages
    /// compiled for their stemcells, so deploys on those stemcells compile
    /// none of them.
    pub fn upload_release(
        &self,
        path: &Path,
        version: Option<&str>,
    ) -> Result<(ReleaseRecord, bool, Vec<String>), OpError> {
        let rel = release::read_release_in(
            path,
            version,
            Some(&self.store.dir().join("tmp")),
            self.blobstores.as_ref(),
        )?;
        let new = if rel.compiled_packages.is_empty() {
            self.store.save_release(&rel)?
        } else {
            self.store.save_compiled_release(&rel)?.0
        };
        let rec = self
            .store
            .release(&rel.manifest.name, &rel.manifest.version)?
            .ok_or_else(|| OpError::Stemcell("release vanished after upload".into()))?;
        Ok((rec, new, rel.warnings))
    }
}

/// The operating system of this host as stemcells name it
/// (`<ID>-<VERSION_CODENAME>` from /etc/os-release, e.g. `debian-bookworm`):
/// the `os` of the local CPI's built-in stemcell, which is the host itself.
pub fn host_os() -> String {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(|v| v.trim_matches('"').to_string())
            .filter(|v| !v.is_empty())
    };
    match (
        field("ID"),
        field("VERSION_CODENAME").or_else(|| field("VERSION_ID")),
    ) {
        (Some(id), Some(v)) => format!("{id}-{v}"),
        (Some(id), None) => id,
        _ => "linux".to_string(),
    }
}

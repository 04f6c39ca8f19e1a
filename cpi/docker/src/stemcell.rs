//! Stemcells of the Docker CPI: images imported from a gzip'd root
//! filesystem tarball (`docker import`), tagged and labelled as this CPI's,
//! and removed when no container uses them.
//!
//! This module must not pull images (there may be no registry) nor remove
//! an image still used by a container.

use std::io;

use bollard::query_parameters::{CreateImageOptions, RemoveImageOptions};
use bosun_cpi::{StemcellCid, StemcellSpec};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::names::{stemcell_repo, stemcell_tag, valid_cid};
use crate::{
    docker_err, io_err, is_not_found, status_of, DockerCpi, DockerCpiError, Result, Target,
    LABEL_CPI, STEMCELL_FORMAT, STEMCELL_LABELS_PREFIX,
};

/// Reads a file as a stream of chunks (for image imports).
fn file_stream(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::result::Result<Bytes, io::Error>> + Send + 'static {
    use tokio::io::AsyncReadExt;
    futures_util::stream::unfold(Some(file), |state| async move {
        let mut file = state?;
        let mut buf = vec![0u8; 256 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

impl DockerCpi {
    pub(crate) async fn do_create_stemcell(&self, spec: &StemcellSpec) -> Result<StemcellCid> {
        let what = format!("creating stemcell {}/{}", spec.name, spec.version);
        let path = spec.image_path.as_ref().ok_or_else(|| {
            DockerCpiError::Invalid(format!(
                "{what}: the stemcell has no image (want a {STEMCELL_FORMAT} stemcell: a gzip'd root filesystem tarball)"
            ))
        })?;
        let file = tokio::fs::File::open(path)
            .await
            .map_err(io_err(format!("{what}: opening the image"), path))?;
        let repo = stemcell_repo(&self.prefix);
        let tag = stemcell_tag(spec);
        let reference = format!("{repo}:{tag}");
        let label = |k: &str, v: &str| {
            format!(
                "LABEL {k}={}",
                serde_json::to_string(v).unwrap_or_else(|_| "\"\"".into())
            )
        };
        let options = CreateImageOptions {
            from_src: Some("-".into()),
            repo: Some(repo.clone()),
            tag: Some(tag.clone()),
            message: Some(format!("bosun stemcell {}/{}", spec.name, spec.version)),
            changes: vec![
                label(LABEL_CPI, &self.prefix),
                label(&format!("{STEMCELL_LABELS_PREFIX}name"), &spec.name),
                label(&format!("{STEMCELL_LABELS_PREFIX}version"), &spec.version),
                label(&format!("{STEMCELL_LABELS_PREFIX}os"), &spec.os),
            ],
            ..Default::default()
        };
        let mut stream = self.docker.create_image(
            Some(options),
            Some(bollard::body_try_stream(file_stream(file))),
            None,
        );
        while let Some(item) = stream.next().await {
            item.map_err(docker_err(
                format!("{what}: importing {} as {reference}", path.display()),
                Target::None,
            ))?;
        }
        let image = self
            .docker
            .inspect_image(&reference)
            .await
            .map_err(docker_err(
                format!("{what}: inspecting imported image {reference}"),
                Target::None,
            ))?;
        let id = image.id.ok_or_else(|| {
            DockerCpiError::Conflict(format!("{what}: imported image {reference} has no id"))
        })?;
        tracing::info!(stemcell = %id, reference = %reference, "imported stemcell");
        Ok(StemcellCid(id))
    }

    pub(crate) async fn do_delete_stemcell(&self, cid: &StemcellCid) -> Result<()> {
        if !valid_cid(&cid.0, true) {
            return Ok(());
        }
        let options = RemoveImageOptions {
            force: false,
            noprune: false,
            platforms: None,
        };
        match self.docker.remove_image(&cid.0, Some(options), None).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) if status_of(&e) == Some(409) => Err(DockerCpiError::Conflict(format!(
                "deleting stemcell {cid}: the image is still used by containers (delete their VMs first): {e}"
            ))),
            Err(e) => Err(docker_err(
                format!("deleting stemcell {cid}"),
                Target::None,
            )(e)),
        }
    }
}

//! Stemcells of the AWS CPI: light stemcells only, whose cloud properties
//! name an existing AMI per region; registering one checks the AMI exists.
//!
//! This module must not upload images nor deregister an AMI: light
//! stemcells are not this CPI's own.

use bosun_cpi::{StemcellCid, StemcellSpec};
use serde_json::Value;

use crate::ec2::Retry;
use crate::{AwsCpi, AwsCpiError, Result, Target};

impl AwsCpi {
    pub(crate) async fn do_create_stemcell(&self, spec: &StemcellSpec) -> Result<StemcellCid> {
        let region = &self.config.region;
        let ami = spec
            .cloud_properties
            .get("ami")
            .and_then(|a| a.get(region))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                AwsCpiError::Invalid(format!(
                    "create_stemcell {}/{}: its cloud_properties name no AMI for region {region} \
                     (ami.{region}): only light stemcells are supported, uploading a full \
                     image is not (yet)",
                    spec.name, spec.version
                ))
            })?;
        let cid = StemcellCid(ami.to_string());
        let out = self
            .ec2(
                format!(
                    "DescribeImages {ami} (stemcell {}/{})",
                    spec.name, spec.version
                ),
                Target::Stemcell(cid.clone()),
                Retry::Transient,
                || self.client.describe_images().image_ids(ami).send(),
            )
            .await?;
        let found = out.images().iter().any(|i| i.image_id() == Some(ami));
        if !found {
            return Err(AwsCpiError::StemcellNotFound(cid));
        }
        tracing::info!(ami, stemcell = %spec.name, version = %spec.version, "light stemcell registered");
        Ok(cid)
    }

    /// A light stemcell's AMI is not ours: forget it, never deregister it.
    pub(crate) fn do_delete_stemcell(&self, cid: &StemcellCid) {
        tracing::info!(ami = %cid, "light stemcell forgotten (AMI kept)");
    }
}

#[cfg(test)]
mod tests {
    use crate::{AwsCpi, AwsCpiConfig};
    use bosun_cpi::{CpiError, StemcellSpec};
    use serde_json::json;

    #[tokio::test]
    async fn a_light_stemcell_without_an_ami_for_the_region_is_refused() {
        let mut config = AwsCpiConfig::new("us-east-1");
        config.endpoint = Some("http://127.0.0.1:9".into());
        config.access_key_id = Some("test".into());
        config.secret_access_key = Some("test".into());
        let cpi = AwsCpi::new(config).await.unwrap();
        let spec = StemcellSpec {
            name: "bosh-aws-xen-hvm-ubuntu-jammy-go_agent".into(),
            os: "ubuntu-jammy".into(),
            version: "1.1".into(),
            image_path: None,
            cloud_properties: json!({"ami": {"eu-west-1": "ami-1"}}),
        };
        let e = bosun_cpi::Cpi::create_stemcell(&cpi, &spec)
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, CpiError::Fatal { .. }), "{e:?}");
        assert!(
            text.contains("light stemcells are supported") && text.contains("us-east-1"),
            "{text}"
        );
        let info = bosun_cpi::Cpi::info(&cpi).await.unwrap();
        assert_eq!(info.name, "aws");
        assert_eq!(info.api_version, 2);
        assert_eq!(info.stemcell_formats, vec!["aws-light"]);
    }
}

//! Metadata as EC2 tags: tags to and from metadata, tag filters for
//! listing, tag specifications at creation, and tagging existing resources.
//!
//! This module must not decide what is tagged: callers pass the metadata.

use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};
use bosun_cpi::Metadata;

use crate::ec2::Retry;
use crate::{AwsCpi, Result, Target};

pub(crate) fn tags_of(metadata: &Metadata) -> Vec<Tag> {
    metadata
        .iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

/// A resource's tags as metadata (a tag without a key is skipped, one
/// without a value is empty).
pub fn metadata_of_tags(tags: &[Tag]) -> Metadata {
    tags.iter()
        .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or("").to_string())))
        .collect()
}

/// The EC2 filters of a metadata filter: `tag:<key>` = value, one per entry;
/// `None` when there is none. EC2 reads `*`, `?` and `\` in filter values as
/// wildcards and escapes, so entries with those are left to the exact
/// comparison every caller makes on the tags it gets back.
pub fn tag_filters(filter: &Metadata) -> Option<Vec<Filter>> {
    let filters: Vec<Filter> = filter
        .iter()
        .filter(|(_, v)| !v.contains(['*', '?', '\\']))
        .map(|(k, v)| Filter::builder().name(format!("tag:{k}")).values(v).build())
        .collect();
    (!filters.is_empty()).then_some(filters)
}

pub(crate) fn tag_spec(kind: ResourceType, tags: Vec<Tag>) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(kind)
        .set_tags(Some(tags))
        .build()
}

impl AwsCpi {
    pub(crate) async fn create_tags(
        &self,
        what: String,
        target: Target,
        id: &str,
        metadata: &Metadata,
    ) -> Result<()> {
        if metadata.is_empty() {
            return Ok(());
        }
        let tags = tags_of(metadata);
        self.ec2(what, target, Retry::AfterCreate, || {
            self.client
                .create_tags()
                .resources(id)
                .set_tags(Some(tags.clone()))
                .send()
        })
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_filters_become_one_tag_filter_per_entry() {
        assert!(tag_filters(&Metadata::new()).is_none());
        let filter = Metadata::from([
            ("director".to_string(), "d-1".to_string()),
            ("token".to_string(), "t".to_string()),
            // A wildcard for EC2: left to the exact comparison.
            ("name".to_string(), "web/*".to_string()),
        ]);
        let filters = tag_filters(&filter).unwrap();
        let pairs: Vec<(&str, Vec<&str>)> = filters
            .iter()
            .map(|f| {
                (
                    f.name().unwrap(),
                    f.values().iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            pairs,
            vec![("tag:director", vec!["d-1"]), ("tag:token", vec!["t"])]
        );
    }

    #[test]
    fn tags_become_metadata() {
        let tags = vec![
            Tag::builder().key("director").value("d").build(),
            Tag::builder().key("empty").build(),
            Tag::builder().value("no key").build(),
        ];
        assert_eq!(
            metadata_of_tags(&tags),
            Metadata::from([
                ("director".to_string(), "d".to_string()),
                ("empty".to_string(), String::new()),
            ])
        );
    }
}

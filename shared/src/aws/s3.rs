//! The claim check's store: envelopes in S3 ([`crate::claim_check`] has the pointers and the rules).

use futures_util::future::BoxFuture;

use crate::claim_check::{PayloadStore, S3Pointer};

/// Envelopes in S3.
#[derive(Debug, Clone)]
pub struct S3PayloadStore {
    client: aws_sdk_s3::Client,
    /// Where pointers may point (a consumer's: its claim check's bucket and prefix); `None`
    /// accepts any.
    only: Option<(String, String)>,
}

impl S3PayloadStore {
    /// A store on `config` (path-style addressing when `AWS_ENDPOINT_URL` points elsewhere than
    /// AWS, as emulators need).
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        let s3 = aws_sdk_s3::config::Builder::from(config)
            .force_path_style(std::env::var("AWS_ENDPOINT_URL").is_ok_and(|e| !e.is_empty()))
            .build();
        Self {
            client: aws_sdk_s3::Client::from_conf(s3),
            only: None,
        }
    }

    /// The same, reading only what `settings` stores (a pointer elsewhere, which anyone able to
    /// send to the queue could write, is refused rather than fetched with the consumer's rights).
    pub fn only(mut self, settings: &crate::claim_check::ClaimCheckSettings) -> Self {
        self.only = Some((settings.bucket.clone(), settings.prefix.clone()));
        self
    }
}

impl PayloadStore for S3PayloadStore {
    fn accepts(&self, pointer: &S3Pointer) -> bool {
        self.only.as_ref().is_none_or(|(bucket, prefix)| {
            pointer.bucket == *bucket && pointer.key.starts_with(prefix.as_str())
        })
    }

    fn put<'a>(
        &'a self,
        pointer: &'a S3Pointer,
        body: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.put_object(pointer, body))
    }

    fn get<'a>(&'a self, pointer: &'a S3Pointer) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(self.get_object(pointer))
    }
}

impl S3PayloadStore {
    async fn put_object(&self, pointer: &S3Pointer, body: &str) -> Result<(), String> {
        self.client
            .put_object()
            .bucket(&pointer.bucket)
            .key(&pointer.key)
            .content_type("application/cloudevents+json")
            .body(body.as_bytes().to_vec().into())
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                format!(
                    "claim check: storing {}: {}",
                    pointer.uri(),
                    super::describe(&e)
                )
            })
    }

    async fn get_object(&self, pointer: &S3Pointer) -> Result<String, String> {
        let object = self
            .client
            .get_object()
            .bucket(&pointer.bucket)
            .key(&pointer.key)
            .send()
            .await
            .map_err(|e| {
                format!(
                    "claim check: reading {}: {}",
                    pointer.uri(),
                    super::describe(&e)
                )
            })?;
        let bytes = object
            .body
            .collect()
            .await
            .map_err(|e| format!("claim check: reading {}: {e}", pointer.uri()))?
            .into_bytes();
        String::from_utf8(bytes.to_vec())
            .map_err(|_| format!("claim check: {} is not UTF-8", pointer.uri()))
    }
}

//! Claim check for large events: an envelope larger than the bus takes (or than a threshold) is
//! stored in S3 by the dispatcher, and the message carries a pointer to it instead.
//!
//! On SNS and NATS the pointer is the one AWS's extended client libraries write and read
//! (`amazon-sqs-extended-client`, the SNS and SQS extended clients for Java): the body
//! `["software.amazon.payloadoffloading.PayloadS3Pointer",{"s3BucketName":"…","s3Key":"…"}]` and
//! the attribute (NATS: header) `ExtendedPayloadSize` with the envelope's size in bytes, so a
//! consumer using that library reads the full envelope. EventBridge's `Detail` must be a JSON
//! object: there the message is the envelope without `data`, with the CloudEvents `dataref`
//! extension `s3://<bucket>/<key>` (the rules that match envelopes match it too).
//!
//! The object is the whole envelope, at `<prefix><tenant>/<event id>.json`: a re-publish or a
//! replay writes the same key again. Consumers read it and never delete it (the bucket's
//! lifecycle rule does, after the retention the template sets). The projection sink and
//! `outboxctl nats consume` resolve pointers ([`resolve`]); a pointer they cannot fetch (S3
//! unavailable, the object gone) is an error of that delivery, retried by the queue like any
//! other; nothing is acknowledged before it is read. The feed serves events from the database,
//! in full.

use futures_util::future::BoxFuture;
use serde_json::Value;

/// The pointer class AWS's extended clients write.
pub const POINTER_CLASS: &str = "software.amazon.payloadoffloading.PayloadS3Pointer";
/// The pointer class the first SQS extended client for Java wrote (read, never written).
pub const LEGACY_POINTER_CLASS: &str = "com.amazon.sqs.javamessaging.MessageS3Pointer";
/// The message attribute (NATS header) holding the stored envelope's size.
pub const SIZE_ATTRIBUTE: &str = "ExtendedPayloadSize";

/// Where a stored envelope is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Pointer {
    /// The bucket.
    pub bucket: String,
    /// The object's key.
    pub key: String,
}

impl S3Pointer {
    /// The extended clients' pointer body.
    pub fn body(&self) -> String {
        serde_json::json!([POINTER_CLASS, {"s3BucketName": self.bucket, "s3Key": self.key}])
            .to_string()
    }

    /// The pointer of an extended-client body, if `value` is one.
    pub fn of_body(value: &Value) -> Option<Self> {
        let [class, details] = value.as_array()?.as_slice() else {
            return None;
        };
        if class != POINTER_CLASS && class != LEGACY_POINTER_CLASS {
            return None;
        }
        Some(Self {
            bucket: details.get("s3BucketName")?.as_str()?.to_owned(),
            key: details.get("s3Key")?.as_str()?.to_owned(),
        })
    }

    /// `s3://<bucket>/<key>`, the envelope's `dataref`.
    pub fn uri(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }

    /// The pointer of an `s3://` URI.
    pub fn of_uri(uri: &str) -> Option<Self> {
        let (bucket, key) = uri.strip_prefix("s3://")?.split_once('/')?;
        (!bucket.is_empty() && !key.is_empty()).then(|| Self {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
        })
    }
}

/// The claim check's settings (the dispatcher's `CLAIM_CHECK_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimCheckSettings {
    /// `CLAIM_CHECK_BUCKET`: where envelopes go. Without it there is no claim check, and an
    /// envelope over the bus's limit is dead-lettered.
    pub bucket: String,
    /// `CLAIM_CHECK_THRESHOLD_BYTES`: envelopes over this go to S3; at most, and by default, the
    /// bus's limit for one entry (256 KiB on SNS and EventBridge, the server's max_payload on
    /// NATS).
    pub threshold: Option<usize>,
    /// `CLAIM_CHECK_PREFIX` (default `outbox/`): the keys' prefix.
    pub prefix: String,
}

impl ClaimCheckSettings {
    /// From the environment; `None` when `CLAIM_CHECK_BUCKET` is unset or empty.
    pub fn from_env() -> Result<Option<Self>, crate::config::ConfigError> {
        use crate::config::{optional_env, ConfigError};
        let Some(bucket) = optional_env("CLAIM_CHECK_BUCKET") else {
            return Ok(None);
        };
        let threshold =
            match optional_env("CLAIM_CHECK_THRESHOLD_BYTES") {
                None => None,
                Some(v) => Some(v.parse::<usize>().ok().filter(|n| *n >= 1024).ok_or_else(
                    || ConfigError::Invalid {
                        name: "CLAIM_CHECK_THRESHOLD_BYTES",
                        reason: "must be a number of bytes, at least 1024".into(),
                    },
                )?),
            };
        let prefix = optional_env("CLAIM_CHECK_PREFIX").unwrap_or_else(|| "outbox/".into());
        Ok(Some(Self {
            bucket,
            threshold,
            prefix,
        }))
    }

    /// The key of an event's envelope.
    /// The tenant is percent-encoded but for letters, digits, `-`, `_` and `.` (a SQL producer's
    /// tenant may hold `/` or control characters, and a key is at most 1,024 bytes: a longer
    /// tenant is cut to 256 bytes of encoding, the event id keeps the key unique).
    pub fn key(&self, tenant_id: &str, event_id: uuid::Uuid) -> String {
        let mut tenant = String::with_capacity(tenant_id.len());
        for b in tenant_id.bytes() {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                tenant.push(b as char);
            } else {
                tenant.push_str(&format!("%{b:02X}"));
            }
            if tenant.len() >= 256 {
                break;
            }
        }
        format!("{}{tenant}/{event_id}.json", self.prefix)
    }
}

/// Where envelopes are stored and read back (S3: [`crate::aws::s3::S3PayloadStore`]). Boxed
/// futures: the dispatcher and the consumers hold it as `dyn PayloadStore`, on a path taken by
/// large events only.
pub trait PayloadStore: Send + Sync {
    /// Whether it reads what `pointer` points to (by default, anything).
    fn accepts(&self, pointer: &S3Pointer) -> bool {
        let _ = pointer;
        true
    }
    /// Stores `body` at `pointer`.
    fn put<'a>(
        &'a self,
        pointer: &'a S3Pointer,
        body: &'a str,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// Reads what `pointer` points to.
    fn get<'a>(&'a self, pointer: &'a S3Pointer) -> BoxFuture<'a, Result<String, String>>;
}

/// Where a delivery's envelope is: in the message, or behind a pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Carried {
    /// The message is the envelope (or not one at all: the sink says why).
    Inline,
    /// The envelope is stored at this pointer.
    Stored(S3Pointer),
}

/// Whether a message body (as an SQS consumer gets it: raw, SNS-wrapped, an EventBridge event;
/// or a NATS message) carries its envelope or a pointer to it.
pub fn carried(body: &str) -> Carried {
    let Ok(value) = serde_json::from_str::<Value>(body) else {
        return Carried::Inline;
    };
    if let Some(pointer) = S3Pointer::of_body(&value) {
        return Carried::Stored(pointer);
    }
    if value.get("Type").and_then(Value::as_str) == Some("Notification") {
        if let Some(inner) = value
            .get("Message")
            .and_then(Value::as_str)
            .and_then(|m| serde_json::from_str::<Value>(m).ok())
        {
            if let Some(pointer) = S3Pointer::of_body(&inner) {
                return Carried::Stored(pointer);
            }
        }
    }
    let envelope = value.get("detail").unwrap_or(&value);
    if envelope.get("data").is_none() {
        if let Some(pointer) = envelope
            .get("dataref")
            .and_then(Value::as_str)
            .and_then(S3Pointer::of_uri)
        {
            return Carried::Stored(pointer);
        }
    }
    Carried::Inline
}

/// The envelope a delivery carries: `body` itself, or the stored envelope it points to (read
/// from `store`). An error when it points and there is no store, or the store cannot read it.
pub async fn resolve(store: Option<&dyn PayloadStore>, body: &str) -> Result<String, String> {
    match carried(body) {
        Carried::Inline => Ok(body.to_owned()),
        Carried::Stored(pointer) => match store {
            Some(store) if !store.accepts(&pointer) => Err(format!(
                "claim check: the pointer names {}, outside this consumer's bucket and prefix; refused",
                pointer.uri()
            )),
            Some(store) => store.get(&pointer).await,
            None => Err(format!(
                "claim check: the envelope is stored at {} and this consumer has no S3 access (set CLAIM_CHECK_BUCKET)",
                pointer.uri()
            )),
        },
    }
}

/// EventBridge's message for a stored envelope: the envelope without `data`, with `dataref`.
pub fn dataref_body(envelope: &str, pointer: &S3Pointer) -> Result<String, String> {
    let mut value: Value =
        serde_json::from_str(envelope).map_err(|e| format!("claim check: {e}"))?;
    let object = value
        .as_object_mut()
        .ok_or("claim check: the envelope is not an object")?;
    object.remove("data");
    object.insert("dataref".into(), pointer.uri().into());
    Ok(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_are_read_in_every_shape_a_consumer_gets_them() {
        let pointer = S3Pointer {
            bucket: "b".into(),
            key: "outbox/acme/e.json".into(),
        };
        let body = pointer.body();
        assert_eq!(
            body,
            r#"["software.amazon.payloadoffloading.PayloadS3Pointer",{"s3BucketName":"b","s3Key":"outbox/acme/e.json"}]"#
        );
        let wrapped = serde_json::json!({"Type": "Notification", "Message": body}).to_string();
        let detail = dataref_body(r#"{"specversion":"1.0","data":{"a":1}}"#, &pointer).unwrap();
        let bridged = serde_json::json!({"detail-type": "x", "detail": serde_json::from_str::<Value>(&detail).unwrap()}).to_string();
        for shape in [&body, &wrapped, &detail, &bridged] {
            assert_eq!(carried(shape), Carried::Stored(pointer.clone()), "{shape}");
        }
        let legacy = serde_json::json!([LEGACY_POINTER_CLASS, {"s3BucketName": "b", "s3Key": "k"}]);
        assert!(S3Pointer::of_body(&legacy).is_some());
        // Tried: an envelope, an envelope with both data and dataref, another array, garbage.
        for inline in [
            r#"{"specversion":"1.0","data":{}}"#,
            r#"{"specversion":"1.0","data":{},"dataref":"s3://b/k"}"#,
            r#"["something.else",{"s3BucketName":"b","s3Key":"k"}]"#,
            "not json",
        ] {
            assert_eq!(carried(inline), Carried::Inline, "{inline}");
        }
        assert_eq!(S3Pointer::of_uri("s3://b/"), None);
        assert_eq!(S3Pointer::of_uri("https://b/k"), None);
    }
}

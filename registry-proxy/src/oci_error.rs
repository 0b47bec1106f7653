//! OCI distribution error responses (`{"errors":[{"code":…,"message":…}]}`).

use bytes::Bytes;
use http::StatusCode;

/// The error codes of the OCI distribution spec that shoal itself answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OciErrorCode {
    BlobUnknown,
    DigestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    Unsupported,
    RangeNotSatisfiable,
    /// Not an OCI code: the upstream registry could not be reached or failed.
    UpstreamUnavailable,
}

impl OciErrorCode {
    fn as_str(self) -> &'static str {
        match self {
            Self::BlobUnknown => "BLOB_UNKNOWN",
            Self::DigestInvalid => "DIGEST_INVALID",
            Self::ManifestUnknown => "MANIFEST_UNKNOWN",
            Self::NameInvalid => "NAME_INVALID",
            Self::NameUnknown => "NAME_UNKNOWN",
            Self::Unsupported => "UNSUPPORTED",
            Self::RangeNotSatisfiable => "RANGE_INVALID",
            Self::UpstreamUnavailable => "UPSTREAM_UNAVAILABLE",
        }
    }
}

/// An error shoal answers with, as status plus an OCI error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciError {
    pub status: StatusCode,
    pub code: OciErrorCode,
    pub message: String,
}

impl OciError {
    pub fn new(status: StatusCode, code: OciErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// The JSON body of the error.
    pub fn body(&self) -> Bytes {
        let body = serde_json::json!({
            "errors": [{ "code": self.code.as_str(), "message": self.message }]
        });
        Bytes::from(body.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_oci_shaped_and_escapes_message() {
        let e = OciError::new(
            StatusCode::NOT_FOUND,
            OciErrorCode::NameInvalid,
            "bad \"name\"",
        );
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["errors"][0]["code"], "NAME_INVALID");
        assert_eq!(v["errors"][0]["message"], "bad \"name\"");
    }
}

//! Content addresses of blobs.
//!
//! shoal stores and verifies blobs by their OCI digest. Only `sha256` is accepted: it is what
//! every registry and containerd use for blobs, and accepting an algorithm we cannot verify
//! would let unverified bytes into the store.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

const PREFIX: &str = "sha256:";
const HEX_LEN: usize = 64;

/// The sha256 digest of a blob, as in `sha256:<64 lowercase hex>`.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct BlobDigest([u8; 32]);

/// Why a string is not a digest shoal accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The string has no `algorithm:` part.
    #[error("digest has no algorithm prefix (expected `sha256:<64 hex>`)")]
    MissingAlgorithm,
    /// An algorithm other than sha256.
    #[error("digest algorithm `{0}` is not supported (only sha256)")]
    UnsupportedAlgorithm(String),
    /// The hex part has the wrong length or characters.
    #[error("digest hex must be 64 lowercase hex characters")]
    BadHex,
}

impl BlobDigest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// Wraps a raw 32-byte sha256 output.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex characters, without the algorithm: safe as a file name.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for BlobDigest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((algorithm, hex_part)) = s.split_once(':') else {
            return Err(DigestError::MissingAlgorithm);
        };
        if algorithm != &PREFIX[..PREFIX.len() - 1] {
            // Bound what we echo back: the input is hostile and may be huge.
            let shown: String = algorithm.chars().take(32).collect();
            return Err(DigestError::UnsupportedAlgorithm(shown));
        }
        // Uppercase hex is not canonical in OCI; accepting it would give one blob two names.
        if hex_part.len() != HEX_LEN
            || !hex_part
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(DigestError::BadHex);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| DigestError::BadHex)?;
        Ok(Self(out))
    }
}

impl fmt::Display for BlobDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.hex())
    }
}

impl fmt::Debug for BlobDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_prints_canonical_form() {
        let d: BlobDigest = EMPTY.parse().unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d, BlobDigest::of(b""));
    }

    #[test]
    fn rejects_hostile_input() {
        let hex64 = &EMPTY[7..];
        let cases = [
            ("", DigestError::MissingAlgorithm),
            (hex64, DigestError::MissingAlgorithm),
            (
                "sha512:abc",
                DigestError::UnsupportedAlgorithm("sha512".into()),
            ),
            (
                "SHA256:abc",
                DigestError::UnsupportedAlgorithm("SHA256".into()),
            ),
            ("sha256:", DigestError::BadHex),
            ("sha256:abc", DigestError::BadHex),
            (&format!("sha256:{hex64}0"), DigestError::BadHex),
            (
                &format!("sha256:{}", hex64.to_uppercase()),
                DigestError::BadHex,
            ),
            (&format!("sha256:{}/..", &hex64[..60]), DigestError::BadHex),
            ("sha256:../../../../etc/passwd", DigestError::BadHex),
            (&format!("sha256:{}é", &hex64[..63]), DigestError::BadHex),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<BlobDigest>(), Err(want), "input {input:?}");
        }
    }

    #[test]
    fn overlong_algorithm_is_truncated_in_error() {
        let input = format!("{}:{}", "a".repeat(10_000), &EMPTY[7..]);
        let Err(DigestError::UnsupportedAlgorithm(shown)) = input.parse::<BlobDigest>() else {
            panic!("expected unsupported algorithm");
        };
        assert_eq!(shown.len(), 32);
    }
}

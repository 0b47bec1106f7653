//! Who may read a blob: the registry decides, never the cache.
//!
//! Before shoald serves a blob from its store (or from a shared fetch), it sends the
//! registry a `HEAD` of that blob with the client's own credentials. A yes is remembered
//! briefly, keyed by a hash of the credentials, the registry, the repository and the digest,
//! so that a pull of many layers costs one `HEAD` per layer and not one per request. A no is
//! never remembered and goes back to the client as the registry said it, `WWW-Authenticate`
//! challenge included, so that containerd fetches a token from the registry's realm.

use std::time::{Duration, Instant};

use dashmap::DashMap;
use http::header::CONTENT_LENGTH;
use http::{Method, StatusCode};
use sha2::{Digest as _, Sha256};
use shoal_proto::BlobDigest;
use shoal_registry_proxy::{ForwardHeaders, Registry, RepositoryName, Upstream, UpstreamError};

/// How long a registry's yes is trusted.
const ALLOW_TTL: Duration = Duration::from_secs(30);
/// Above this many remembered answers, expired ones are dropped.
const PRUNE_AT: usize = 10_000;

/// The registry's answer for one client and one blob.
#[derive(Debug)]
pub enum Access {
    /// The client may read the blob, which has this many bytes (if the registry said).
    Allowed { len: Option<u64> },
    /// The registry said no (401, 403, 404, …): pass its answer back.
    Denied(reqwest::Response),
}

#[derive(Debug, Default)]
pub struct Authz {
    allowed: DashMap<[u8; 32], (Instant, Option<u64>)>,
}

impl Authz {
    /// Asks the registry (or remembers) whether the client behind `headers` may read `digest`
    /// from `name` on `registry`.
    pub async fn check(
        &self,
        upstream: &Upstream,
        registry: &Registry,
        name: &RepositoryName,
        digest: &BlobDigest,
        path: &str,
        headers: &ForwardHeaders,
    ) -> Result<Access, UpstreamError> {
        let key = cache_key(registry, name, digest, headers);
        if let Some(entry) = self.allowed.get(&key)
            && entry.0.elapsed() < ALLOW_TTL
        {
            return Ok(Access::Allowed { len: entry.1 });
        }
        let resp = upstream
            .send(Method::HEAD, registry, path, &headers.without_range())
            .await?;
        if resp.status() != StatusCode::OK {
            return Ok(Access::Denied(resp));
        }
        let len = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if self.allowed.len() >= PRUNE_AT {
            self.allowed.retain(|_, (at, _)| at.elapsed() < ALLOW_TTL);
        }
        self.allowed.insert(key, (Instant::now(), len));
        Ok(Access::Allowed { len })
    }
}

/// The credentials are hashed, not kept: the map never holds a usable token.
fn cache_key(
    registry: &Registry,
    name: &RepositoryName,
    digest: &BlobDigest,
    headers: &ForwardHeaders,
) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [
        headers
            .authorization
            .as_ref()
            .map_or(&b""[..], |v| v.as_bytes()),
        registry.as_str().as_bytes(),
        name.as_str().as_bytes(),
        digest.as_bytes(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn key_separates_credentials_repositories_and_digests() {
        let r: Registry = "r.io".parse().unwrap();
        let n: RepositoryName = "a/b".parse().unwrap();
        let d = BlobDigest::of(b"x");
        let anon = ForwardHeaders::default();
        let alice = ForwardHeaders {
            authorization: Some(HeaderValue::from_static("Basic YQ==")),
            ..Default::default()
        };
        let k = cache_key(&r, &n, &d, &alice);
        assert_ne!(k, cache_key(&r, &n, &d, &anon));
        assert_ne!(k, cache_key(&r, &"a/c".parse().unwrap(), &d, &alice));
        assert_ne!(k, cache_key(&r, &n, &BlobDigest::of(b"y"), &alice));
        assert_ne!(k, cache_key(&"s.io".parse().unwrap(), &n, &d, &alice));
        assert_eq!(k, cache_key(&r, &n, &d, &alice.clone()));
    }
}

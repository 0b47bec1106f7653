//! What containerd asks for: `/v2/<name>/{manifests,blobs}/<reference>?ns=<registry>`.
//!
//! Every part arrives from the network, so every part is validated against the OCI
//! distribution grammar before it is used for anything: a repository name with `..`, a
//! registry host with a path in it, or a digest shoal cannot verify is rejected here.

use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use regex::Regex;
use shoal_proto::{BlobDigest, DigestError};

/// The longest repository name the distribution spec lets registries accept.
const MAX_NAME_LEN: usize = 255;
/// The longest registry host (with port) shoal accepts in `ns=`.
const MAX_REGISTRY_LEN: usize = 255;

static NAME_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$",
    )
    .expect("static regex")
});
static TAG_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$").expect("static regex"));
static HOST_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
        .expect("static regex")
});

/// A parsed request of the distribution API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET|HEAD /v2/`: the API version check.
    Base,
    /// `/v2/<name>/manifests/<tag or digest>`.
    Manifest {
        name: RepositoryName,
        reference: Reference,
    },
    /// `/v2/<name>/blobs/<digest>`.
    Blob {
        name: RepositoryName,
        digest: BlobDigest,
    },
}

/// Why a path is not a request shoal serves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Not under `/v2/`, or not a manifests/blobs path.
    #[error("no such endpoint: {0}")]
    UnknownPath(String),
    /// The repository name breaks the OCI grammar.
    #[error("invalid repository name: {0}")]
    BadName(String),
    /// The tag breaks the OCI grammar.
    #[error("invalid tag: {0}")]
    BadTag(String),
    /// The digest is malformed or uses an algorithm shoal cannot verify.
    #[error("invalid digest: {0}")]
    BadDigest(#[from] DigestError),
    /// The `ns=` registry is not a host name with an optional port.
    #[error("invalid registry in ns=: {0}")]
    BadRegistry(String),
}

impl Route {
    /// Parses a request path (without the query).
    pub fn parse(path: &str) -> Result<Self, RouteError> {
        let unknown = || RouteError::UnknownPath(truncate(path));
        let rest = path.strip_prefix("/v2/").ok_or_else(unknown)?;
        if rest.is_empty() {
            return Ok(Self::Base);
        }
        let (before_ref, reference) = rest.rsplit_once('/').ok_or_else(unknown)?;
        let (name, kind) = before_ref.rsplit_once('/').ok_or_else(unknown)?;
        let name: RepositoryName = name.parse()?;
        match kind {
            "manifests" => Ok(Self::Manifest {
                name,
                reference: reference.parse()?,
            }),
            "blobs" => Ok(Self::Blob {
                name,
                digest: reference.parse()?,
            }),
            _ => Err(unknown()),
        }
    }

    /// The repository the request is about, if any.
    pub fn name(&self) -> Option<&RepositoryName> {
        match self {
            Self::Base => None,
            Self::Manifest { name, .. } | Self::Blob { name, .. } => Some(name),
        }
    }
}

/// A repository name such as `library/nginx`, checked against the OCI grammar.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepositoryName(String);

impl RepositoryName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for RepositoryName {
    type Err = RouteError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_NAME_LEN || !NAME_RE.is_match(s) {
            return Err(RouteError::BadName(truncate(s)));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for RepositoryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A manifest reference: a tag, or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(String),
    Digest(BlobDigest),
}

impl FromStr for Reference {
    type Err = RouteError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            return Ok(Self::Digest(s.parse()?));
        }
        if !TAG_RE.is_match(s) {
            return Err(RouteError::BadTag(truncate(s)));
        }
        Ok(Self::Tag(s.to_owned()))
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tag(t) => f.write_str(t),
            Self::Digest(d) => d.fmt(f),
        }
    }
}

/// An upstream registry host, as containerd names it in `ns=` (`docker.io`, `ghcr.io`,
/// `127.0.0.1:5000`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Registry(String);

impl Registry {
    /// The name containerd and users know it by.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The host to connect to: Docker Hub's API lives on `registry-1.docker.io`.
    pub fn api_host(&self) -> &str {
        match self.0.as_str() {
            "docker.io" | "index.docker.io" => "registry-1.docker.io",
            other => other,
        }
    }

    /// The registry named by the `ns=` parameter of a query string, if there is one.
    pub fn from_query(query: Option<&str>) -> Result<Option<Self>, RouteError> {
        let Some(query) = query else { return Ok(None) };
        form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "ns")
            .map(|(_, v)| v.parse())
            .transpose()
    }
}

impl FromStr for Registry {
    type Err = RouteError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_REGISTRY_LEN || !HOST_RE.is_match(s) {
            return Err(RouteError::BadRegistry(truncate(s)));
        }
        if let Some((_, port)) = s.rsplit_once(':').filter(|_| !s.ends_with(']'))
            && port.parse::<u16>().is_err()
        {
            return Err(RouteError::BadRegistry(truncate(s)));
        }
        Ok(Self(s.to_ascii_lowercase()))
    }
}

impl fmt::Display for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Hostile input ends up in error messages and logs: keep it short.
fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_the_three_endpoints() {
        assert_eq!(Route::parse("/v2/").unwrap(), Route::Base);
        let Route::Manifest { name, reference } =
            Route::parse("/v2/library/nginx/manifests/1.27").unwrap()
        else {
            panic!("not a manifest")
        };
        assert_eq!(name.as_str(), "library/nginx");
        assert_eq!(reference, Reference::Tag("1.27".into()));
        let Route::Blob { name, digest } = Route::parse(&format!("/v2/a/b/c/blobs/{D}")).unwrap()
        else {
            panic!("not a blob")
        };
        assert_eq!(name.as_str(), "a/b/c");
        assert_eq!(digest.to_string(), D);
        assert!(matches!(
            Route::parse(&format!("/v2/x/manifests/{D}")).unwrap(),
            Route::Manifest {
                reference: Reference::Digest(_),
                ..
            }
        ));
    }

    #[test]
    fn rejects_traversal_and_bad_names() {
        for path in [
            "/v2/../etc/blobs/x",
            "/v2/a/../b/manifests/latest",
            "/v2//manifests/latest",
            "/v2/a//b/manifests/latest",
            "/v2/A/manifests/latest",
            "/v2/a/manifests/",
            "/v2/a/manifests/..",
            "/v2/a/manifests/-x",
            "/v2/%2e%2e/manifests/latest",
            "/v2/a/tags/list",
            "/v2/a/blobs/uploads/",
            "/v3/a/manifests/latest",
            "/v2/a/manifests/latest/extra",
            "/v2/a/b",
        ] {
            assert!(Route::parse(path).is_err(), "{path} accepted");
        }
        let long = format!("/v2/{}/manifests/latest", "a".repeat(256));
        assert!(matches!(Route::parse(&long), Err(RouteError::BadName(_))));
        let long_tag = format!("/v2/a/manifests/{}", "t".repeat(129));
        assert!(matches!(
            Route::parse(&long_tag),
            Err(RouteError::BadTag(_))
        ));
    }

    #[test]
    fn rejects_bad_digests() {
        for r in [
            "sha256:abc",
            "md5:0123",
            "sha512:00",
            &format!("{D}0"),
            &D.to_uppercase(),
            "sha256:",
        ] {
            assert!(
                matches!(
                    Route::parse(&format!("/v2/a/blobs/{r}")),
                    Err(RouteError::BadDigest(_))
                ),
                "{r} accepted"
            );
        }
        assert!(Route::parse("/v2/a/blobs/latest").is_err());
    }

    #[test]
    fn registry_from_ns() {
        let r = Registry::from_query(Some("ns=docker.io")).unwrap().unwrap();
        assert_eq!(r.api_host(), "registry-1.docker.io");
        let r = Registry::from_query(Some("x=1&ns=127.0.0.1%3A5000"))
            .unwrap()
            .unwrap();
        assert_eq!(r.as_str(), "127.0.0.1:5000");
        assert_eq!(Registry::from_query(Some("x=1")).unwrap(), None);
        assert_eq!(Registry::from_query(None).unwrap(), None);
        for bad in [
            "ns=evil.com/path",
            "ns=evil.com%2Fpath",
            "ns=a@b",
            "ns=host:99999",
            "ns=host:",
            "ns=-host",
            "ns=",
            "ns=a..b",
            "ns=h%0d%0ax",
        ] {
            assert!(Registry::from_query(Some(bad)).is_err(), "{bad} accepted");
        }
        assert!(Registry::from_query(Some(&format!("ns={}", "a".repeat(300)))).is_err());
    }
}

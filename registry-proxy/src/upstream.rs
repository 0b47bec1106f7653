//! The HTTP client shoal uses to reach registries.
//!
//! - One `reqwest` client per registry that has its own CA, one shared client for the rest.
//! - Plain HTTP only for registries the operator named insecure.
//! - Redirects are followed (blobs often live in object storage); reqwest drops
//!   `Authorization` when a redirect leaves the host, so credentials never reach a host they
//!   were not meant for.
//! - Deadlines everywhere: on connecting, on the response headers, and on every body chunk,
//!   because containerd never times out a mirror that stops sending.
//! - One retry, after a short pause, on 429/502/503/504 and on connection failures.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, RANGE};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use crate::Registry;

/// How long to wait before the single retry of a failed request.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// How to reach registries.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Registries spoken to over plain HTTP.
    pub insecure: HashSet<Registry>,
    /// Extra trusted CA certificates (PEM) per registry.
    pub ca_pem: HashMap<Registry, Vec<u8>>,
    /// Deadline for the TCP + TLS connection.
    pub connect_timeout: Duration,
    /// Deadline from sending a request to having the response headers.
    pub header_timeout: Duration,
    /// Longest pause between two body chunks before the body counts as stalled.
    pub stall_timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            insecure: HashSet::new(),
            ca_pem: HashMap::new(),
            connect_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(20),
            stall_timeout: Duration::from_secs(20),
        }
    }
}

/// Why a registry request failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// A CA file given for a registry is not valid PEM.
    #[error("CA certificate for registry {registry} is not valid PEM: {source}")]
    BadCa {
        registry: Registry,
        source: reqwest::Error,
    },
    /// The client could not be built (TLS backend failure).
    #[error("cannot build the HTTP client: {0}")]
    Client(reqwest::Error),
    /// Connecting, or sending the request, failed.
    #[error("request to registry {registry} failed: {source}")]
    Request {
        registry: Registry,
        source: reqwest::Error,
    },
    /// No response headers within the deadline.
    #[error("registry {registry} sent no response within {after:?}")]
    HeaderTimeout { registry: Registry, after: Duration },
    /// The body stopped arriving.
    #[error("registry body stalled for {0:?}")]
    Stalled(Duration),
    /// The body failed mid-way.
    #[error("registry body failed: {0}")]
    Body(reqwest::Error),
}

impl UpstreamError {
    /// Whether the failure is a timeout (answer 504) rather than a broken upstream (502).
    pub fn is_timeout(&self) -> bool {
        match self {
            Self::HeaderTimeout { .. } | Self::Stalled(_) => true,
            Self::Request { source, .. } | Self::Body(source) => source.is_timeout(),
            _ => false,
        }
    }
}

/// The client headers that go upstream: credentials, accepted media types, and a range.
#[derive(Debug, Clone, Default)]
pub struct ForwardHeaders {
    pub authorization: Option<HeaderValue>,
    pub accept: Vec<HeaderValue>,
    pub range: Option<HeaderValue>,
}

impl ForwardHeaders {
    /// Picks the headers that matter from a client request.
    pub fn from_client(headers: &HeaderMap) -> Self {
        Self {
            authorization: headers.get(AUTHORIZATION).cloned(),
            accept: headers.get_all(ACCEPT).iter().cloned().collect(),
            range: headers.get(RANGE).cloned(),
        }
    }

    /// The same headers without `Range`.
    pub fn without_range(&self) -> Self {
        Self {
            range: None,
            ..self.clone()
        }
    }
}

/// Clients for every registry shoal talks to.
#[derive(Debug, Clone)]
pub struct Upstream {
    shared: reqwest::Client,
    with_ca: HashMap<Registry, reqwest::Client>,
    insecure: HashSet<Registry>,
    header_timeout: Duration,
    stall_timeout: Duration,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> Result<Self, UpstreamError> {
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(config.connect_timeout)
                .redirect(reqwest::redirect::Policy::limited(10))
                .user_agent(concat!("shoal/", env!("CARGO_PKG_VERSION")))
        };
        let shared = builder().build().map_err(UpstreamError::Client)?;
        let mut with_ca = HashMap::new();
        for (registry, pem) in &config.ca_pem {
            let cert =
                reqwest::Certificate::from_pem(pem).map_err(|source| UpstreamError::BadCa {
                    registry: registry.clone(),
                    source,
                })?;
            let client = builder()
                .add_root_certificate(cert)
                .build()
                .map_err(UpstreamError::Client)?;
            with_ca.insert(registry.clone(), client);
        }
        Ok(Self {
            shared,
            with_ca,
            insecure: config.insecure.clone(),
            header_timeout: config.header_timeout,
            stall_timeout: config.stall_timeout,
        })
    }

    /// The URL of `path_and_query` (starting with `/v2/`) on `registry`.
    pub fn url(&self, registry: &Registry, path_and_query: &str) -> String {
        let scheme = if self.insecure.contains(registry) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{}{path_and_query}", registry.api_host())
    }

    /// Sends a request and waits for its response headers, retrying once on 429/5xx and on
    /// connection failures.
    pub async fn send(
        &self,
        method: Method,
        registry: &Registry,
        path_and_query: &str,
        headers: &ForwardHeaders,
    ) -> Result<reqwest::Response, UpstreamError> {
        let first = self
            .send_once(method.clone(), registry, path_and_query, headers)
            .await;
        let retry = match &first {
            Ok(resp) => is_retryable(resp.status()),
            Err(UpstreamError::Request { source, .. }) => source.is_connect(),
            Err(_) => false,
        };
        if !retry {
            return first;
        }
        tracing::debug!(%registry, path_and_query, "retrying registry request once");
        tokio::time::sleep(RETRY_PAUSE).await;
        self.send_once(method, registry, path_and_query, headers)
            .await
    }

    async fn send_once(
        &self,
        method: Method,
        registry: &Registry,
        path_and_query: &str,
        headers: &ForwardHeaders,
    ) -> Result<reqwest::Response, UpstreamError> {
        let client = self.with_ca.get(registry).unwrap_or(&self.shared);
        let mut req = client.request(method, self.url(registry, path_and_query));
        if let Some(auth) = &headers.authorization {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        for accept in &headers.accept {
            req = req.header(ACCEPT, accept.clone());
        }
        if let Some(range) = &headers.range {
            req = req.header(RANGE, range.clone());
        }
        match tokio::time::timeout(self.header_timeout, req.send()).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(source)) => Err(UpstreamError::Request {
                registry: registry.clone(),
                source,
            }),
            Err(_) => Err(UpstreamError::HeaderTimeout {
                registry: registry.clone(),
                after: self.header_timeout,
            }),
        }
    }

    /// The next chunk of a response body, or `None` at its end; fails when no chunk arrives
    /// within the stall deadline.
    pub async fn next_chunk(
        &self,
        resp: &mut reqwest::Response,
    ) -> Result<Option<Bytes>, UpstreamError> {
        match tokio::time::timeout(self.stall_timeout, resp.chunk()).await {
            Ok(chunk) => chunk.map_err(UpstreamError::Body),
            Err(_) => Err(UpstreamError::Stalled(self.stall_timeout)),
        }
    }

    /// The stall deadline, for callers that report it.
    pub fn stall_timeout(&self) -> Duration {
        self.stall_timeout
    }
}

/// Parses a `--registry-ca HOST=FILE` flag and reads the file.
pub fn parse_registry_ca(s: &str) -> Result<(Registry, Vec<u8>), String> {
    let (host, file) = s
        .split_once('=')
        .ok_or_else(|| format!("--registry-ca {s:?}: expected HOST=FILE"))?;
    let registry = host
        .parse::<Registry>()
        .map_err(|e| format!("--registry-ca: {e}"))?;
    let pem = std::fs::read(file)
        .map_err(|e| format!("--registry-ca {host}: cannot read {file}: {e}"))?;
    Ok((registry, pem))
}

fn is_retryable(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A one-purpose HTTP server: answers each connection with `respond(request_text)` and
    /// records the requests it saw. Serves at most `max` connections, then stops.
    async fn serve(
        max: usize,
        respond: impl Fn(&str) -> String + Send + 'static,
    ) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handle = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..max {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 8192];
                let n = sock.read(&mut buf).await.unwrap();
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let answer = respond(&req);
                seen.push(req);
                sock.write_all(answer.as_bytes()).await.unwrap();
                sock.shutdown().await.ok();
            }
            seen
        });
        (addr, handle)
    }

    fn insecure(addrs: &[&str]) -> Upstream {
        let cfg = UpstreamConfig {
            insecure: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            header_timeout: Duration::from_secs(2),
            stall_timeout: Duration::from_millis(300),
            ..Default::default()
        };
        Upstream::new(&cfg).unwrap()
    }

    fn auth() -> ForwardHeaders {
        ForwardHeaders {
            authorization: Some(HeaderValue::from_static("Bearer secret")),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn authorization_is_not_sent_across_a_redirect_to_another_host() {
        let (storage, storage_seen) = serve(1, |_| {
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok".into()
        })
        .await;
        let target = format!("http://{storage}/blob");
        let (registry, registry_seen) = serve(1, move |_| {
            format!("HTTP/1.1 307 Temporary Redirect\r\nlocation: {target}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        })
        .await;
        let upstream = insecure(&[&registry]);
        let reg: Registry = registry.parse().unwrap();
        let mut resp = upstream
            .send(Method::GET, &reg, "/v2/a/blobs/x", &auth())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(upstream.next_chunk(&mut resp).await.unwrap().unwrap(), "ok");
        let to_registry = &registry_seen.await.unwrap()[0];
        let to_storage = &storage_seen.await.unwrap()[0];
        assert!(
            to_registry
                .to_lowercase()
                .contains("authorization: bearer secret")
        );
        assert!(
            !to_storage.to_lowercase().contains("authorization"),
            "{to_storage}"
        );
    }

    #[tokio::test]
    async fn retries_once_on_503() {
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = count.clone();
        let (addr, seen) = serve(2, move |_| {
            if c.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    .into()
            } else {
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into()
            }
        })
        .await;
        let upstream = insecure(&[&addr]);
        let resp = upstream
            .send(Method::HEAD, &addr.parse().unwrap(), "/v2/", &auth())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(seen.await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn stalled_body_fails_within_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = sock.read(&mut buf).await.unwrap();
            sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(3)).await;
        });
        let upstream = insecure(&[&addr]);
        let mut resp = upstream
            .send(Method::GET, &addr.parse().unwrap(), "/v2/", &auth())
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let mut result = Ok(None);
        for _ in 0..10 {
            result = upstream.next_chunk(&mut resp).await;
            if !matches!(result, Ok(Some(_))) {
                break;
            }
        }
        assert!(
            matches!(result, Err(UpstreamError::Stalled(_))),
            "{result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        server.abort();
    }

    #[test]
    fn url_scheme_follows_insecure_list() {
        let u = insecure(&["localhost:5000"]);
        assert_eq!(
            u.url(&"localhost:5000".parse().unwrap(), "/v2/"),
            "http://localhost:5000/v2/"
        );
        assert_eq!(
            u.url(&"docker.io".parse().unwrap(), "/v2/"),
            "https://registry-1.docker.io/v2/"
        );
    }
}

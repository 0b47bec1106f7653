//! The HTTP front containerd talks to: `/v2/` manifests and blobs, `/healthz`, `/metrics`.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::{Stream, TryStreamExt as _};
use http::header::{
    ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HeaderName, WWW_AUTHENTICATE,
};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::Frame;
use shoal_proto::BlobDigest;
use shoal_registry_proxy::range::unsatisfied_content_range;
use shoal_registry_proxy::{
    ByteRange, ForwardHeaders, OciError, OciErrorCode, RangeError, Registry, RepositoryName, Route,
    RouteError, Upstream, UpstreamError,
};

use crate::authz::{Access, Authz};
use crate::body::{BlobReader, Fallback, Feed};
use crate::flight::{FetchRequest, FlightFailure, FlightState, Flights};
use crate::metrics::{Metrics, RequestKind, Source};
use crate::store::Store;

pub type Body = UnsyncBoxBody<Bytes, io::Error>;

const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
/// Headers of a registry's answer that containerd needs to see as they were.
const PASSED_HEADERS: [&str; 7] = [
    "content-type",
    "content-length",
    "docker-content-digest",
    "www-authenticate",
    "docker-distribution-api-version",
    "retry-after",
    "content-range",
];

/// Everything a request handler needs.
#[derive(Debug)]
pub struct App {
    pub default_registry: Registry,
    pub upstream: Upstream,
    pub store: Arc<Store>,
    pub flights: Arc<Flights>,
    pub authz: Authz,
    pub metrics: Arc<Metrics>,
}

/// One log line and the request metrics, written when the response body is done.
struct RequestLog {
    metrics: Arc<Metrics>,
    method: Method,
    kind: RequestKind,
    status: StatusCode,
    registry: String,
    repository: String,
    /// The blob or manifest digest, or the tag of a manifest asked for by tag.
    reference: String,
    source: Option<Source>,
    bytes: u64,
    started: Instant,
}

impl RequestLog {
    fn count(&mut self, bytes: usize) {
        self.bytes += bytes as u64;
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        self.metrics.request(self.kind, self.status.as_u16());
        if let Some(source) = self.source {
            self.metrics.served(source, self.bytes);
        }
        tracing::info!(
            method = %self.method,
            status = self.status.as_u16(),
            registry = %self.registry,
            repository = %self.repository,
            digest = if self.reference.starts_with("sha256:") { self.reference.as_str() } else { "-" },
            tag = if self.reference.starts_with("sha256:") { "-" } else { self.reference.as_str() },
            bytes = self.bytes,
            source = self.source.map_or("-", Source::as_str),
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
    }
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A streamed body that finishes `log` when the client has it all (or goes away).
fn streamed(
    stream: impl Stream<Item = io::Result<Bytes>> + Send + 'static,
    mut log: RequestLog,
) -> Body {
    let stream = stream.inspect_ok(move |chunk| log.count(chunk.len()));
    StreamBody::new(stream.map_ok(Frame::data)).boxed_unsync()
}

fn oci(err: OciError) -> Response<Body> {
    let mut resp = Response::new(full(err.body()));
    *resp.status_mut() = err.status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn upstream_failure(e: &UpstreamError) -> OciError {
    let status = if e.is_timeout() {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::BAD_GATEWAY
    };
    OciError::new(status, OciErrorCode::UpstreamUnavailable, e.to_string())
}

fn route_failure(e: &RouteError) -> OciError {
    let (status, code) = match e {
        RouteError::UnknownPath(_) => (StatusCode::NOT_FOUND, OciErrorCode::Unsupported),
        RouteError::BadName(_) | RouteError::BadRegistry(_) => {
            (StatusCode::BAD_REQUEST, OciErrorCode::NameInvalid)
        }
        RouteError::BadTag(_) => (StatusCode::BAD_REQUEST, OciErrorCode::ManifestUnknown),
        RouteError::BadDigest(_) => (StatusCode::BAD_REQUEST, OciErrorCode::DigestInvalid),
    };
    OciError::new(status, code, e.to_string())
}

/// Answers one request. Never panics on what the client sends.
pub async fn handle<B>(app: &App, req: Request<B>) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let mut log = RequestLog {
        metrics: app.metrics.clone(),
        method: method.clone(),
        kind: RequestKind::Other,
        status: StatusCode::OK,
        registry: String::new(),
        repository: String::new(),
        reference: String::new(),
        source: None,
        bytes: 0,
        started,
    };
    match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => return Response::new(full("ok\n")),
        (&Method::GET, "/metrics") => {
            return Response::new(full(
                app.metrics
                    .encode(app.store.used(), app.flights.uploads_given()),
            ));
        }
        _ => {}
    }
    match route(app, &req, &mut log).await {
        Ok(resp) => {
            log.status = resp.status();
            let (parts, body) = resp.into_parts();
            let body = match body {
                Some(stream) => streamed(stream, log),
                None => empty(),
            };
            Response::from_parts(parts, body)
        }
        Err(e) => {
            log.status = e.status;
            oci(e)
        }
    }
}

type BodyStream = std::pin::Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;
/// A response whose body, if any, is still to be streamed.
type Answer = Result<Response<Option<BodyStream>>, OciError>;

async fn route<B>(app: &App, req: &Request<B>, log: &mut RequestLog) -> Answer {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(OciError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            OciErrorCode::Unsupported,
            "shoald is a pull-through mirror: only GET and HEAD",
        ));
    }
    let route = Route::parse(req.uri().path()).map_err(|e| route_failure(&e))?;
    let registry = Registry::from_query(req.uri().query())
        .map_err(|e| route_failure(&e))?
        .unwrap_or_else(|| app.default_registry.clone());
    log.registry = registry.to_string();
    let headers = ForwardHeaders::from_client(req.headers());
    let path = req.uri().path();
    match &route {
        Route::Base => {
            log.kind = RequestKind::Base;
            passthrough(app, req.method(), &registry, path, &headers).await
        }
        Route::Manifest { name, reference } => {
            log.kind = RequestKind::Manifest;
            log.repository = name.to_string();
            log.reference = reference.to_string();
            passthrough(app, req.method(), &registry, path, &headers).await
        }
        Route::Blob { name, digest } => {
            log.kind = RequestKind::Blob;
            log.repository = name.to_string();
            log.reference = digest.to_string();
            blob(
                app,
                req.method(),
                &registry,
                name,
                digest,
                path,
                &headers,
                log,
            )
            .await
        }
    }
}

/// Sends the request to the registry and streams its answer back unchanged.
async fn passthrough(
    app: &App,
    method: &Method,
    registry: &Registry,
    path: &str,
    headers: &ForwardHeaders,
) -> Answer {
    let resp = app
        .upstream
        .send(method.clone(), registry, path, headers)
        .await
        .map_err(|e| upstream_failure(&e))?;
    let mut out = Response::builder().status(resp.status());
    for name in PASSED_HEADERS {
        for value in resp.headers().get_all(name) {
            out = out.header(name, value);
        }
    }
    let body: Option<BodyStream> = if *method == Method::HEAD {
        None
    } else {
        let upstream = app.upstream.clone();
        Some(Box::pin(futures_util::stream::try_unfold(
            resp,
            move |mut resp| {
                let upstream = upstream.clone();
                async move {
                    let chunk = upstream
                        .next_chunk(&mut resp)
                        .await
                        .map_err(io::Error::other)?;
                    Ok(chunk.map(|c| (c, resp)))
                }
            },
        )))
    };
    out.body(body).map_err(|e| {
        OciError::new(
            StatusCode::BAD_GATEWAY,
            OciErrorCode::UpstreamUnavailable,
            e.to_string(),
        )
    })
}

#[allow(clippy::too_many_arguments)]
async fn blob(
    app: &App,
    method: &Method,
    registry: &Registry,
    name: &RepositoryName,
    digest: &BlobDigest,
    path: &str,
    headers: &ForwardHeaders,
    log: &mut RequestLog,
) -> Answer {
    let access = app
        .authz
        .check(&app.upstream, registry, name, digest, path, headers)
        .await;
    let len = match access.map_err(|e| upstream_failure(&e))? {
        Access::Allowed { len: Some(len) } => len,
        Access::Allowed { len: None } => {
            // Without a length there is nothing to check a range or a store entry against.
            log.source = Some(Source::Registry);
            return passthrough(app, method, registry, path, headers).await;
        }
        Access::Denied(resp) => {
            let mut out = Response::builder().status(resp.status());
            for name in [WWW_AUTHENTICATE, CONTENT_TYPE] {
                if let Some(v) = resp.headers().get(&name) {
                    out = out.header(name, v);
                }
            }
            return Ok(out
                .header(CONTENT_LENGTH, 0)
                .body(None)
                .expect("valid response"));
        }
    };

    let range = match headers
        .range
        .as_ref()
        .map(|h| ByteRange::parse(h.to_str().unwrap_or(""), len))
    {
        None | Some(Err(RangeError::Malformed | RangeError::Multiple)) => None,
        Some(Ok(range)) => Some(range),
        Some(Err(RangeError::Unsatisfiable { .. })) => {
            let resp = Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(CONTENT_RANGE, unsatisfied_content_range(len))
                .header(CONTENT_LENGTH, 0)
                .body(None)
                .expect("valid response");
            return Ok(resp);
        }
    };
    let (start, end) = range.map_or((0, len), |r| (r.start, r.end_inclusive + 1));
    let mut out = Response::builder()
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(DOCKER_CONTENT_DIGEST, digest.to_string())
        .header(ACCEPT_RANGES, "bytes")
        .header(CONTENT_LENGTH, end - start);
    out = match range {
        Some(r) => out
            .status(StatusCode::PARTIAL_CONTENT)
            .header(CONTENT_RANGE, r.content_range(len)),
        None => out.status(StatusCode::OK),
    };

    let reader = if let Some(stored) = app.store.open_complete(digest) {
        app.metrics.store_hit();
        log.source = Some(Source::Store);
        let mut reader = BlobReader::new(
            Feed::Stored(stored.file),
            start,
            end,
            stored.len,
            app.metrics.clone(),
        );
        reader.lease = Some(stored.lease);
        reader
    } else {
        app.metrics.store_miss();
        log.source = Some(Source::Registry);
        if *method == Method::HEAD {
            return Ok(out.body(None).expect("valid response"));
        }
        let fetch = FetchRequest {
            registry: registry.clone(),
            repository: name.to_string(),
            path: path.to_owned(),
            headers: headers.clone(),
            digest: *digest,
            len,
        };
        let flight = match app
            .flights
            .join_or_start(fetch, &app.store, &app.upstream, &app.metrics)
        {
            Ok((flight, _started)) => flight,
            Err(e) => {
                tracing::warn!(%digest, error = %e, "store cannot take the blob; streaming from the registry");
                return passthrough(app, method, registry, path, headers).await;
            }
        };
        let mut state = flight.watch();
        // Wait for the registry's answer so that a failure can still be a clean 502/504.
        // Bounded: the fetch itself has header and connect deadlines.
        let first = state
            .wait_for(|s| *s != FlightState::Connecting)
            .await
            .map(|s| s.clone());
        if let Ok(FlightState::Failed(FlightFailure::BeforeStart { status, message })) = first {
            let status = if status.is_success() {
                StatusCode::BAD_GATEWAY
            } else {
                status
            };
            return Err(OciError::new(
                status,
                OciErrorCode::UpstreamUnavailable,
                message,
            ));
        }
        let lease = app.store.pin(digest);
        let mut reader = BlobReader::new(
            Feed::Following(flight, state),
            start,
            end,
            len,
            app.metrics.clone(),
        );
        reader.lease = lease;
        reader.fallback = Some(Fallback {
            upstream: app.upstream.clone(),
            registry: registry.clone(),
            path: path.to_owned(),
            headers: headers.clone(),
        });
        reader
    };
    if *method == Method::HEAD {
        return Ok(out.body(None).expect("valid response"));
    }
    Ok(out
        .body(Some(Box::pin(reader.into_stream()) as BodyStream))
        .expect("valid response"))
}

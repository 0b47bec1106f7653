//! An embedded, in-memory origin registry: serves one image's manifest (by tag and digest)
//! and blobs (with Range) over plain HTTP, and counts the blob bytes it sends. It lets
//! `shoal demo` and the benches run with nothing but the repo; the end-to-end tests use the
//! real `docker-registry` instead.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use shoal_proto::BlobDigest;
use shoal_registry_proxy::{ByteRange, Reference, Route};
use tokio::net::TcpListener;

use crate::image::{Blob, Image, MANIFEST_TYPE};

/// A running origin. Dropping it stops the server.
pub struct Origin {
    pub addr: SocketAddr,
    blob_bytes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Content {
    repo: String,
    tag: String,
    manifest: Bytes,
    manifest_digest: BlobDigest,
    blobs: HashMap<BlobDigest, Bytes>,
    blob_bytes: Arc<AtomicU64>,
}

impl Origin {
    /// Serves `image` as `repo:tag` on a free loopback port.
    pub async fn start(image: &Image, repo: &str, tag: &str) -> std::io::Result<Origin> {
        Self::start_with(image, repo, tag, &[], None).await
    }

    /// Like [`Origin::start`], also serving the `extra` blobs, and sending the blob
    /// `corrupt` (if any) with its last byte flipped, as a broken registry or cache would.
    pub async fn start_with(
        image: &Image,
        repo: &str,
        tag: &str,
        extra: &[Blob],
        corrupt: Option<BlobDigest>,
    ) -> std::io::Result<Origin> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let blob_bytes = Arc::new(AtomicU64::new(0));
        let content = Arc::new(Content {
            repo: repo.to_owned(),
            tag: tag.to_owned(),
            manifest: image.manifest.bytes.clone(),
            manifest_digest: image.manifest.digest,
            blobs: image
                .blobs()
                .chain(extra)
                .map(|b| {
                    let mut bytes = b.bytes.to_vec();
                    if Some(b.digest) == corrupt
                        && let Some(last) = bytes.last_mut()
                    {
                        *last ^= 0xff;
                    }
                    (b.digest, Bytes::from(bytes))
                })
                .collect(),
            blob_bytes: blob_bytes.clone(),
        });
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let content = content.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let content = content.clone();
                        async move { Ok::<_, Infallible>(answer(&content, &req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Origin {
            addr,
            blob_bytes,
            task,
        })
    }

    /// Blob bytes sent so far.
    pub fn blob_bytes_sent(&self) -> u64 {
        self.blob_bytes.load(Ordering::Relaxed)
    }
}

fn answer<B>(content: &Content, req: &Request<B>) -> Response<Full<Bytes>> {
    let status = |s: StatusCode| {
        Response::builder()
            .status(s)
            .body(Full::default())
            .expect("valid response")
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let (body, media_type, digest) = match Route::parse(req.uri().path()) {
        Ok(Route::Base) => return status(StatusCode::OK),
        Ok(Route::Manifest { name, reference }) if name.as_str() == content.repo => {
            let known = match reference {
                Reference::Tag(t) => t == content.tag,
                Reference::Digest(d) => d == content.manifest_digest,
            };
            if !known {
                return status(StatusCode::NOT_FOUND);
            }
            (
                content.manifest.clone(),
                MANIFEST_TYPE,
                content.manifest_digest,
            )
        }
        Ok(Route::Blob { name, digest }) if name.as_str() == content.repo => {
            match content.blobs.get(&digest) {
                Some(bytes) => (bytes.clone(), "application/octet-stream", digest),
                None => return status(StatusCode::NOT_FOUND),
            }
        }
        _ => return status(StatusCode::NOT_FOUND),
    };
    let total = body.len() as u64;
    let range = req
        .headers()
        .get("range")
        .and_then(|h| ByteRange::parse(h.to_str().ok()?, total).ok());
    let mut resp = Response::builder()
        .header("content-type", media_type)
        .header("docker-content-digest", digest.to_string());
    let body = match range {
        Some(r) => {
            resp = resp
                .status(StatusCode::PARTIAL_CONTENT)
                .header("content-range", r.content_range(total));
            body.slice(r.start as usize..=r.end_inclusive as usize)
        }
        None => body,
    };
    let resp = resp.header("content-length", body.len());
    if req.method() == Method::HEAD {
        return resp.body(Full::default()).expect("valid response");
    }
    if media_type != MANIFEST_TYPE {
        content
            .blob_bytes
            .fetch_add(body.len() as u64, Ordering::Relaxed);
    }
    resp.body(Full::new(body)).expect("valid response")
}

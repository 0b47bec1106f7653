//! shoald's HTTP front, in process, against the embedded origin registry: hostile requests,
//! headers, Range on cached and in-flight blobs, empty blobs, a registry that sends bytes
//! that do not match their digest, a full disk, and a stop with connections open.

use std::time::Duration;

use shoal::image::{Blob, Image, LayerSpec};
use shoal::origin::Origin;
use shoal_daemon::config::{Config, ServeArgs};
use shoal_proto::BlobDigest;

const REPO: &str = "front/app";

struct Front {
    url: String,
    ns: String,
    data_dir: std::path::PathBuf,
    _daemon: shoal_daemon::RunningDaemon,
}

async fn front(origin: &Origin, data_dir: &std::path::Path, cache_size: &str) -> Front {
    let ns = origin.addr.to_string();
    let args = ServeArgs {
        listen: Some("127.0.0.1:0".into()),
        data_dir: Some(data_dir.to_owned()),
        cache_size: Some(cache_size.into()),
        insecure_registries: vec![ns.clone()],
        stall_timeout: Some("5s".into()),
        ..Default::default()
    };
    let daemon = shoal_daemon::Daemon::bind(&Config::resolve(args, None).unwrap())
        .await
        .unwrap()
        .spawn()
        .unwrap();
    Front {
        url: daemon.url.clone(),
        ns,
        data_dir: data_dir.to_owned(),
        _daemon: daemon,
    }
}

impl Front {
    fn blob(&self, digest: &BlobDigest) -> String {
        format!("{}/v2/{REPO}/blobs/{digest}?ns={}", self.url, self.ns)
    }

    fn stored(&self, digest: &BlobDigest) -> bool {
        self.data_dir
            .join("blobs/sha256")
            .join(digest.hex())
            .exists()
    }
}

fn image() -> Image {
    Image::build(
        &[
            LayerSpec::Random { size: 3 << 20 },
            LayerSpec::Gzip { files: 4 },
        ],
        9,
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_requests_get_oci_errors() {
    let image = image();
    let origin = Origin::start(&image, REPO, "1").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = front(&origin, dir.path(), "1GiB").await;
    let c = client();
    let d = image.layers[0].digest;
    for (path, status) in [
        (format!("/v2/a/..%2f..%2fetc/blobs/{d}"), 400),
        ("/v2/a/blobs/sha256:1234".to_string(), 400),
        (format!("/v2/a/blobs/md5:{}", &d.hex()[..32]), 400),
        (format!("/v2/a/blobs/{d}?ns=evil.com%2Fpath"), 400),
        (format!("/v2/a/blobs/{d}?ns=a%40b"), 400),
        ("/v2/a/tags/list".to_string(), 404),
        ("/v1/_ping".to_string(), 404),
        (format!("/v2/{}/manifests/latest", "a".repeat(300)), 400),
    ] {
        let resp = c.get(format!("{}{path}", f.url)).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{path}");
        assert_eq!(resp.headers()["content-type"], "application/json", "{path}");
        let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        assert!(body["errors"][0]["code"].is_string(), "{path}: {body}");
    }
    // Dot segments sent raw (an HTTP client library would resolve them first).
    let addr = f.url.trim_start_matches("http://");
    for path in [
        "/v2/../etc/passwd/blobs/x",
        "/v2/a/../../manifests/latest",
        "/v2/a/manifests/..",
    ] {
        let head = raw_get(addr, path).await;
        assert!(
            head.starts_with("HTTP/1.1 400") || head.starts_with("HTTP/1.1 404"),
            "{path}: {head}"
        );
        assert!(head.contains("application/json"), "{path}: {head}");
    }
    let resp = c.post(f.blob(&d)).body("x").send().await.unwrap();
    assert_eq!(resp.status(), 405);
    let resp = c.delete(f.blob(&d)).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(
        c.get(format!("{}/healthz", f.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let metrics = c
        .get(format!("{}/metrics", f.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("shoald_requests_total{kind=\"Other\",status=\"405\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn headers_and_ranges_on_in_flight_and_cached_blobs() {
    let image = image();
    let empty = Blob::new("application/octet-stream", Vec::new());
    let origin = Origin::start_with(&image, REPO, "1", std::slice::from_ref(&empty), None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = front(&origin, dir.path(), "1GiB").await;
    let c = client();
    let layer = &image.layers[0];
    let len = layer.bytes.len() as u64;

    // Manifest by tag: resolved upstream, headers passed through.
    let resp = c
        .head(format!("{}/v2/{REPO}/manifests/1?ns={}", f.url, f.ns))
        .header("accept", shoal::image::MANIFEST_TYPE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["docker-content-digest"],
        image.manifest.digest.to_string().as_str()
    );
    assert_eq!(resp.headers()["content-type"], shoal::image::MANIFEST_TYPE);
    assert_eq!(
        resp.headers()["content-length"],
        image.manifest.bytes.len().to_string().as_str()
    );

    // HEAD of an uncached blob: its headers, and no fetch.
    let resp = c.head(f.blob(&layer.digest)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], len.to_string().as_str());
    assert_eq!(
        resp.headers()["docker-content-digest"],
        layer.digest.to_string().as_str()
    );
    assert_eq!(origin.blob_bytes_sent(), 0);

    // A Range on an uncached blob starts the shared fetch and is answered from it.
    let resp = c
        .get(f.blob(&layer.digest))
        .header("range", "bytes=1000-")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes 1000-{}/{len}", len - 1).as_str()
    );
    assert_eq!(resp.bytes().await.unwrap(), layer.bytes.slice(1000..));

    // Cached: full, ranged, suffix, unsatisfiable, several ranges (ignored: whole blob).
    for _ in 0..50 {
        if f.stored(&layer.digest) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(f.stored(&layer.digest));
    let resp = c.get(f.blob(&layer.digest)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    assert_eq!(resp.bytes().await.unwrap(), layer.bytes);
    let resp = c
        .get(f.blob(&layer.digest))
        .header("range", "bytes=5-9")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.bytes().await.unwrap(), layer.bytes.slice(5..10));
    let resp = c
        .get(f.blob(&layer.digest))
        .header("range", "bytes=-3")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.bytes().await.unwrap(),
        layer.bytes.slice(len as usize - 3..)
    );
    let resp = c
        .get(f.blob(&layer.digest))
        .header("range", format!("bytes={len}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 416);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes */{len}").as_str()
    );
    let resp = c
        .get(f.blob(&layer.digest))
        .header("range", "bytes=0-1,5-6")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = c
        .get(f.blob(&layer.digest))
        .header("range", "bytes=99999999999999999999999-")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "a malformed Range is ignored");
    assert_eq!(
        origin.blob_bytes_sent(),
        len,
        "the blob crossed from the registry once"
    );

    // An empty blob.
    let resp = c.get(f.blob(&empty.digest)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], "0");
    assert!(resp.bytes().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn bytes_that_fail_the_digest_are_never_served_whole_nor_stored() {
    let image = image();
    let bad = image.layers[0].clone();
    let origin = Origin::start_with(&image, REPO, "1", &[], Some(bad.digest))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = front(&origin, dir.path(), "1GiB").await;
    let c = client();
    for _ in 0..2 {
        // The connection is cut: after the headers and some bytes, or, when the blob is
        // checked before the headers went out, before them. Never a clean end.
        match c.get(f.blob(&bad.digest)).send().await {
            Ok(resp) => {
                assert_eq!(resp.status(), 200);
                let body = resp.bytes().await;
                assert!(body.is_err(), "the connection must be cut, not end cleanly");
            }
            Err(e) => assert!(e.is_request() && !e.is_timeout(), "{e:?}"),
        }
        assert!(!f.stored(&bad.digest));
    }
    assert!(
        std::fs::read_dir(f.data_dir.join("partial"))
            .unwrap()
            .next()
            .is_none()
    );
    // Other blobs are unaffected.
    let good = &image.layers[1];
    assert_eq!(
        c.get(f.blob(&good.digest))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        good.bytes
    );
}

/// A disk that fills up: the store gives up with a clear log line and the blob still
/// streams from the registry. Needs root for the small tmpfs.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_still_serves_from_the_registry() {
    let image = image();
    let origin = Origin::start(&image, REPO, "1").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mount = Tmpfs::mount(dir.path(), "1m");
    let f = front(&origin, &mount.0, "1GiB").await;
    let c = client();
    let layer = &image.layers[0];
    for _ in 0..2 {
        let resp = c.get(f.blob(&layer.digest)).send().await.unwrap();
        let status = resp.status();
        let body = resp.bytes().await;
        // The first request may be cut when the disk fills mid-write after answering; the
        // second must come whole, streamed past the store.
        if let Ok(body) = body {
            assert_eq!(status, 200);
            assert_eq!(body, layer.bytes);
            assert!(!f.stored(&layer.digest));
            assert!(
                origin.blob_bytes_sent() > layer.bytes.len() as u64,
                "the store cannot have held the blob, so it must have come from the registry past it"
            );
            assert!(
                std::fs::read_dir(f.data_dir.join("partial"))
                    .unwrap()
                    .next()
                    .is_none(),
                "partial left behind"
            );
            return;
        }
    }
    panic!("a full disk kept the blob from being served");
}

/// A stop does not wait on connections a client keeps open between requests (containerd
/// does): they close at once, not after the shutdown grace (5 s); the port is closed then.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_does_not_wait_on_idle_connections() {
    let image = image();
    let origin = Origin::start(&image, REPO, "1").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = front(&origin, dir.path(), "1GiB").await;
    let c = client();
    let layer = &image.layers[0];
    let got = c.get(f.blob(&layer.digest)).send().await.unwrap();
    assert_eq!(got.bytes().await.unwrap(), layer.bytes);
    let health = c.get(format!("{}/healthz", f.url)).send().await.unwrap();
    assert_eq!(health.status(), 200);
    // The client keeps its connection open now.
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), f._daemon.stop())
        .await
        .expect("stop hung");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "the stop took {took:?}");
    let after = reqwest::Client::new()
        .get(format!("{}/healthz", f.url))
        .send()
        .await;
    assert!(after.is_err(), "served after the stop: {after:?}");
}

/// A stop lets a response under way finish (within the grace): the client gets the whole
/// blob, and the stop ends once it has.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_lets_a_response_under_way_finish() {
    let image = Image::build(&[LayerSpec::Random { size: 64 << 20 }], 4);
    let origin = Origin::start(&image, REPO, "1").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = front(&origin, dir.path(), "1GiB").await;
    let c = client();
    let layer = &image.layers[0];
    // Stored first: the second response comes from the store.
    let first = c.get(f.blob(&layer.digest)).send().await.unwrap();
    assert_eq!(first.bytes().await.unwrap(), layer.bytes);
    let mut resp = c.get(f.blob(&layer.digest)).send().await.unwrap();
    let mut got = resp.chunk().await.unwrap().expect("a first chunk").to_vec();
    // 64 MiB do not fit in the sockets' buffers: the daemon is still sending.
    let stop = tokio::spawn(f._daemon.stop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !stop.is_finished(),
        "the stop did not wait for the response"
    );
    while let Some(chunk) = resp.chunk().await.unwrap() {
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got.len(), layer.bytes.len());
    assert!(got == layer.bytes, "the blob came back changed");
    tokio::time::timeout(Duration::from_secs(10), stop)
        .await
        .expect("stop hung")
        .unwrap();
}

/// Sends `GET path` as written and returns the response head.
async fn raw_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), sock.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).to_string()
}

/// A tmpfs of a given size, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(parent: &std::path::Path, size: &str) -> Tmpfs {
        let dir = parent.join("small");
        std::fs::create_dir_all(&dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test needs root"
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

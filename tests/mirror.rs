//! shoald as containerd's mirror, end to end, against the real `docker-registry` and the
//! real `containerd` + `ctr`.

mod common;

use shoal::registry::fetch_all_verified;

use std::time::{Duration, Instant};

use common::{Containerd, HANG, Registry, Shoald, configure_containerd};
use shoal::image::{Image, LayerSpec};
use shoal_proto::BlobDigest;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// (a) + (b): a pull through shoald of an image with an empty, a 1-byte, a >100 MiB and a
/// gzip layer unpacks, each blob crosses the registry once, and a second pull on a fresh
/// containerd comes from shoald's store with no blob GET at the registry.
#[test]
fn ctr_pulls_through_shoald_and_a_second_node_root_is_served_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path(), &[]);
    let image = Image::build(
        &[
            LayerSpec::Empty,
            LayerSpec::Random { size: 1 },
            LayerSpec::Random { size: 101 << 20 },
            LayerSpec::Gzip { files: 50 },
        ],
        1,
    );
    assert!(image.layers[2].bytes.len() > 100 << 20);
    rt().block_on(shoal::registry::push(
        &registry.url(),
        "test/app",
        "1",
        &image,
        None,
    ))
    .unwrap();

    let shoald = Shoald::start(
        &dir.path().join("shoald"),
        &["--insecure-registry", &registry.addr],
    );
    let hosts = configure_containerd(dir.path(), &registry.addr, &shoald);
    let reference = format!("{}/test/app:1", registry.addr);

    let first = Containerd::start(&dir.path().join("c1"));
    first.pull(&hosts, &reference, None);
    let (ok, snapshots) = first.ctr_output(&["snapshots", "ls"]);
    assert!(
        ok && snapshots.lines().count() > image.layers.len(),
        "layers not unpacked:\n{snapshots}"
    );
    for blob in image.blobs() {
        assert_eq!(
            registry.blob_gets(&blob.digest),
            1,
            "blob {} crossed the registry other than once",
            blob.digest
        );
    }
    assert_eq!(
        Shoald::verify_store(&shoald.data_dir),
        image.layers.len() + 1
    );

    let gets_before = registry.all_blob_gets();
    let second = Containerd::start(&dir.path().join("c2"));
    second.pull(&hosts, &reference, None);
    assert_eq!(
        registry.all_blob_gets(),
        gets_before,
        "the second pull reached the registry for blobs"
    );
    let metrics = shoald.metrics();
    assert_eq!(
        shoal::demo::served_from(&metrics, "Store"),
        image.blob_bytes(),
        "{metrics}"
    );
}

/// (c) A private registry: a pull with credentials works through shoald; a client without
/// (or with wrong) credentials gets the registry's 401 challenge, not a cached blob.
#[test]
fn private_blobs_stay_private_behind_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path(), &[("alice", "s3cret")]);
    let image = Image::build(
        &[
            LayerSpec::Random { size: 1 << 20 },
            LayerSpec::Gzip { files: 5 },
        ],
        3,
    );
    rt().block_on(shoal::registry::push(
        &registry.url(),
        "private/app",
        "1",
        &image,
        Some(("alice", "s3cret")),
    ))
    .unwrap();
    let shoald = Shoald::start(
        &dir.path().join("shoald"),
        &["--insecure-registry", &registry.addr],
    );
    let hosts = configure_containerd(dir.path(), &registry.addr, &shoald);
    let containerd = Containerd::start(&dir.path().join("c1"));
    containerd.pull(
        &hosts,
        &format!("{}/private/app:1", registry.addr),
        Some("alice:s3cret"),
    );
    assert_eq!(
        Shoald::verify_store(&shoald.data_dir),
        3,
        "the pull should have filled the store"
    );

    let layer = &image.layers[0];
    let url = format!(
        "{}/v2/private/app/blobs/{}?ns={}",
        shoald.url(),
        layer.digest,
        registry.addr
    );
    let client = reqwest::blocking::Client::new();
    let anonymous = client.get(&url).send().unwrap();
    assert_eq!(anonymous.status(), 401);
    let challenge = anonymous
        .headers()
        .get("www-authenticate")
        .expect("challenge passed through");
    assert!(
        challenge.to_str().unwrap().contains("shoal-test"),
        "{challenge:?}"
    );
    assert!(
        anonymous.bytes().unwrap().len() < 1024,
        "an anonymous client got blob bytes"
    );
    let wrong = client
        .get(&url)
        .basic_auth("alice", Some("wrong"))
        .send()
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = client
        .get(&url)
        .basic_auth("alice", Some("s3cret"))
        .send()
        .unwrap();
    assert_eq!(right.status(), 200);
    assert_eq!(BlobDigest::of(&right.bytes().unwrap()), layer.digest);
}

/// (d) 20 concurrent GETs of one uncached blob: one upstream fetch, 20 right answers.
#[test]
fn concurrent_gets_share_one_registry_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path(), &[]);
    let image = Image::build(&[LayerSpec::Random { size: 48 << 20 }], 4);
    rt().block_on(shoal::registry::push(
        &registry.url(),
        "test/big",
        "1",
        &image,
        None,
    ))
    .unwrap();
    let shoald = Shoald::start(
        &dir.path().join("shoald"),
        &["--insecure-registry", &registry.addr],
    );
    let layer = image.layers[0].clone();
    let url = format!(
        "{}/v2/test/big/blobs/{}?ns={}",
        shoald.url(),
        layer.digest,
        registry.addr
    );
    rt().block_on(async {
        let client = reqwest::Client::new();
        let urls = vec![url; 20];
        let results = fetch_all_verified(&client, &urls, &layer.digest);
        for r in tokio::time::timeout(HANG, results)
            .await
            .expect("GETs hung")
        {
            r.unwrap();
        }
    });
    assert_eq!(
        registry.blob_gets(&image.layers[0].digest),
        1,
        "20 clients cost more than one registry fetch"
    );
}

/// (e) shoald killed with SIGKILL in the middle of a pull, then restarted on the same
/// store: nothing corrupt is in the store or served, and the next pull succeeds.
#[test]
fn a_crash_mid_pull_leaves_no_corrupt_blob() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path(), &[]);
    let image = Image::build(
        &[
            LayerSpec::Random { size: 160 << 20 },
            LayerSpec::Random { size: 3 << 20 },
        ],
        5,
    );
    rt().block_on(shoal::registry::push(
        &registry.url(),
        "test/crash",
        "1",
        &image,
        None,
    ))
    .unwrap();
    let data_dir = dir.path().join("shoald");
    let shoald = Shoald::start(&data_dir, &["--insecure-registry", &registry.addr]);
    let big = &image.layers[0];
    let url = format!(
        "{}/v2/test/crash/blobs/{}?ns={}",
        shoald.url(),
        big.digest,
        registry.addr
    );
    let mut resp = reqwest::blocking::get(&url).unwrap();
    assert_eq!(resp.status(), 200);
    let mut first = vec![0u8; 64 * 1024];
    std::io::Read::read_exact(&mut resp, &mut first).unwrap();
    shoald.kill9();
    assert_eq!(&first[..], &big.bytes[..first.len()]);
    Shoald::verify_store(&data_dir);

    let shoald = Shoald::start(&data_dir, &["--insecure-registry", &registry.addr]);
    assert!(
        std::fs::read_dir(data_dir.join("partial"))
            .unwrap()
            .next()
            .is_none(),
        "partial blobs survived a restart"
    );
    let hosts = configure_containerd(dir.path(), &registry.addr, &shoald);
    let containerd = Containerd::start(&dir.path().join("c1"));
    containerd.pull(&hosts, &format!("{}/test/crash:1", registry.addr), None);
    assert_eq!(Shoald::verify_store(&data_dir), image.layers.len() + 1);
}

/// (f) An upstream that stalls mid-body: the client's connection is closed within the stall
/// deadline instead of hanging; one that never answers gets a fast 504.
#[test]
fn a_stalling_registry_never_hangs_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let blob = vec![7u8; 1 << 20];
    let digest = BlobDigest::of(&blob);
    let stalling = rt();
    let upstream = stalling.block_on(stalling_registry(blob.len()));
    let shoald = Shoald::start(
        &dir.path().join("shoald"),
        &[
            "--insecure-registry",
            &upstream,
            "--stall-timeout",
            "2s",
            "--header-timeout",
            "2s",
        ],
    );

    let url = format!(
        "{}/v2/test/stall/blobs/{digest}?ns={upstream}",
        shoald.url()
    );
    let started = Instant::now();
    let mut resp = reqwest::blocking::Client::builder()
        .timeout(HANG)
        .build()
        .unwrap()
        .get(&url)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = Vec::new();
    let result = std::io::Read::read_to_end(&mut resp, &mut body);
    let took = started.elapsed();
    assert!(
        result.is_err() || body.len() < blob.len(),
        "a stalled body was reported complete"
    );
    assert!(
        took < Duration::from_secs(15),
        "client left hanging for {took:?}"
    );

    let url = format!(
        "{}/v2/test/silent/blobs/{digest}?ns={upstream}",
        shoald.url()
    );
    let started = Instant::now();
    let resp = reqwest::blocking::Client::builder()
        .timeout(HANG)
        .build()
        .unwrap()
        .get(&url)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// A registry made for (f): `HEAD` answers with the blob's length; `GET` of a repository
/// named `stall` sends a few bytes and then nothing; anything on `silent` gets no answer.
async fn stalling_registry(len: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        // Bounded: the test makes a handful of requests.
        for _ in 0..32 {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                loop {
                    let Ok(n) = sock.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    if req.contains("/silent/") && req.starts_with("GET") {
                        tokio::time::sleep(HANG).await;
                        return;
                    }
                    if req.starts_with("HEAD") {
                        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
                        sock.write_all(head.as_bytes()).await.unwrap();
                        continue;
                    }
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
                    sock.write_all(head.as_bytes()).await.unwrap();
                    sock.write_all(&vec![7u8; 4096]).await.unwrap();
                    tokio::time::sleep(HANG).await;
                    return;
                }
            });
        }
    });
    addr
}

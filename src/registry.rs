//! Talking to registries as a test or a benchmark needs: push an [`Image`], and pull one
//! through a mirror exactly as containerd does (manifest by tag, then by digest, then config
//! and layers, each with `ns=`), checking every digest.

use anyhow::{Context as _, bail, ensure};
use shoal_proto::BlobDigest;

use crate::image::{Blob, Image, MANIFEST_TYPE};

/// Basic-auth credentials.
pub type Credentials<'a> = Option<(&'a str, &'a str)>;

fn with_auth(req: reqwest::RequestBuilder, auth: Credentials<'_>) -> reqwest::RequestBuilder {
    match auth {
        Some((user, password)) => req.basic_auth(user, Some(password)),
        None => req,
    }
}

/// Pushes `image` as `repo:tag` to the registry at `base` (e.g. `http://127.0.0.1:5000`).
pub async fn push(
    base: &str,
    repo: &str,
    tag: &str,
    image: &Image,
    auth: Credentials<'_>,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    for blob in image.blobs() {
        push_blob(&client, base, repo, blob, auth).await?;
    }
    let url = format!("{base}/v2/{repo}/manifests/{tag}");
    let req = client
        .put(&url)
        .header("content-type", MANIFEST_TYPE)
        .body(image.manifest.bytes.clone());
    let resp = with_auth(req, auth)
        .send()
        .await
        .with_context(|| format!("PUT {url}"))?;
    ensure!(resp.status() == 201, "PUT {url}: {}", resp.status());
    Ok(())
}

/// Uploads one blob (monolithic upload).
pub async fn push_blob(
    client: &reqwest::Client,
    base: &str,
    repo: &str,
    blob: &Blob,
    auth: Credentials<'_>,
) -> anyhow::Result<()> {
    let url = format!("{base}/v2/{repo}/blobs/uploads/");
    let resp = with_auth(client.post(&url), auth)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    ensure!(resp.status() == 202, "POST {url}: {}", resp.status());
    let location = resp
        .headers()
        .get("location")
        .context("upload has no Location")?
        .to_str()?
        .to_owned();
    let location = if location.starts_with('/') {
        format!("{base}{location}")
    } else {
        location
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let url = format!("{location}{sep}digest={}", blob.digest);
    let req = client
        .put(&url)
        .header("content-type", "application/octet-stream")
        .body(blob.bytes.clone());
    let resp = with_auth(req, auth)
        .send()
        .await
        .with_context(|| format!("PUT blob {}", blob.digest))?;
    ensure!(
        resp.status() == 201,
        "PUT blob {}: {}",
        blob.digest,
        resp.status()
    );
    Ok(())
}

/// What a pull moved.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pulled {
    pub blobs: usize,
    pub bytes: u64,
}

/// Pulls `repo:tag` of registry `ns` through the mirror at `mirror` (`http://ADDR`),
/// verifying every digest.
pub async fn pull_through(
    client: &reqwest::Client,
    mirror: &str,
    ns: &str,
    repo: &str,
    tag: &str,
) -> anyhow::Result<Pulled> {
    let url = |what: &str| format!("{mirror}/v2/{repo}/{what}?ns={ns}");
    let head = client
        .head(url(&format!("manifests/{tag}")))
        .header("accept", MANIFEST_TYPE)
        .send()
        .await?;
    ensure!(
        head.status() == 200,
        "HEAD manifest {repo}:{tag}: {}",
        head.status()
    );
    let digest: BlobDigest = head
        .headers()
        .get("docker-content-digest")
        .context("manifest HEAD has no Docker-Content-Digest")?
        .to_str()?
        .parse()?;
    let manifest = fetch_verified(client, &url(&format!("manifests/{digest}")), &digest).await?;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest)?;
    let mut wanted = vec![&manifest["config"]];
    wanted.extend(
        manifest["layers"]
            .as_array()
            .context("manifest has no layers")?,
    );
    let mut pulled = Pulled::default();
    for descriptor in wanted {
        let digest: BlobDigest = descriptor["digest"]
            .as_str()
            .context("descriptor without digest")?
            .parse()?;
        let bytes = fetch_verified(client, &url(&format!("blobs/{digest}")), &digest).await?;
        pulled.blobs += 1;
        pulled.bytes += bytes.len() as u64;
    }
    Ok(pulled)
}

/// GETs every URL at the same moment, each checked against `digest`; one result per URL,
/// in order.
pub async fn fetch_all_verified(
    client: &reqwest::Client,
    urls: &[String],
    digest: &BlobDigest,
) -> Vec<anyhow::Result<bytes::Bytes>> {
    let gets = urls.iter().map(|url| {
        let (client, url, digest) = (client.clone(), url.clone(), *digest);
        tokio::spawn(async move { fetch_verified(&client, &url, &digest).await })
    });
    futures_util::future::join_all(gets)
        .await
        .into_iter()
        .map(|joined| joined.map_err(anyhow::Error::from).and_then(|r| r))
        .collect()
}

/// GETs `url` and checks that the body hashes to `digest`.
pub async fn fetch_verified(
    client: &reqwest::Client,
    url: &str,
    digest: &BlobDigest,
) -> anyhow::Result<bytes::Bytes> {
    let resp = client
        .get(url)
        .header("accept", MANIFEST_TYPE)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    if resp.status() != 200 {
        bail!("GET {url}: {}", resp.status());
    }
    let bytes = resp
        .bytes()
        .await
        .with_context(|| format!("body of {url}"))?;
    ensure!(
        BlobDigest::of(&bytes) == *digest,
        "GET {url}: bytes do not match {digest}"
    );
    Ok(bytes)
}

/// Pulls `repo:tag` from `base` (a mirror, with `ns`, or the registry itself) as containerd
/// does, with every blob of the image fetched at once and hashed as it streams (nothing is
/// kept). Adds each body byte to `progress` as it arrives; returns the bytes pulled.
pub async fn pull_streaming(
    client: &reqwest::Client,
    base: &str,
    ns: Option<&str>,
    repo: &str,
    tag: &str,
    progress: &std::sync::atomic::AtomicU64,
) -> anyhow::Result<u64> {
    use futures_util::StreamExt as _;
    use sha2::{Digest as _, Sha256};
    let url = |what: &str| match ns {
        Some(ns) => format!("{base}/v2/{repo}/{what}?ns={ns}"),
        None => format!("{base}/v2/{repo}/{what}"),
    };
    let head = client
        .head(url(&format!("manifests/{tag}")))
        .header("accept", MANIFEST_TYPE)
        .send()
        .await?;
    ensure!(
        head.status() == 200,
        "HEAD manifest {repo}:{tag}: {}",
        head.status()
    );
    let digest: BlobDigest = head
        .headers()
        .get("docker-content-digest")
        .context("manifest HEAD has no Docker-Content-Digest")?
        .to_str()?
        .parse()?;
    let manifest = fetch_verified(client, &url(&format!("manifests/{digest}")), &digest).await?;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest)?;
    let mut wanted = vec![&manifest["config"]];
    wanted.extend(
        manifest["layers"]
            .as_array()
            .context("manifest has no layers")?,
    );
    let blobs = wanted.into_iter().map(|descriptor| async {
        let digest: BlobDigest = descriptor["digest"]
            .as_str()
            .context("descriptor without digest")?
            .parse()?;
        let url = url(&format!("blobs/{digest}"));
        let resp = client
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        ensure!(resp.status() == 200, "GET {url}: {}", resp.status());
        let mut body = resp.bytes_stream();
        let mut hash = Sha256::new();
        let mut len = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.with_context(|| format!("body of {url}"))?;
            hash.update(&chunk);
            len += chunk.len() as u64;
            progress.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        let got = BlobDigest::from_bytes(hash.finalize().into());
        ensure!(got == digest, "GET {url}: bytes do not match {digest}");
        anyhow::Ok(len)
    });
    let lens = futures_util::future::try_join_all(blobs).await?;
    Ok(lens.into_iter().sum())
}

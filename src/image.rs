//! Test images built in memory: OCI layers (plain tar or gzip), config and manifest, with no
//! network and no external tools. Used by `shoal demo`, the end-to-end tests and benches.

use std::io::Write as _;

use bytes::Bytes;
use rand::{RngCore as _, SeedableRng as _};
use shoal_proto::BlobDigest;

pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const TAR_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const GZIP_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// One layer to build.
#[derive(Debug, Clone)]
pub enum LayerSpec {
    /// A tar with no entries.
    Empty,
    /// A plain tar holding one file of `size` random (incompressible) bytes.
    Random { size: usize },
    /// A gzip tar holding `files` small text files.
    Gzip { files: usize },
}

/// What a plain tar of one file adds to the file: its header block and the two blocks
/// that end the archive.
const ONE_FILE_TAR_OVERHEAD: usize = 512 + 1024;

impl LayerSpec {
    /// A random layer whose blob is `len` bytes (rounded up to the tar's 512-byte blocks),
    /// so that an image of N layers of `len` is as big as asked and its pieces are those of
    /// a `len`-byte blob (`shoal sim` cuts layers of exactly that size).
    pub fn random_blob(len: usize) -> Self {
        LayerSpec::Random {
            size: len.saturating_sub(ONE_FILE_TAR_OVERHEAD),
        }
    }
}

/// A blob with its digest and media type.
#[derive(Debug, Clone)]
pub struct Blob {
    pub digest: BlobDigest,
    pub media_type: &'static str,
    pub bytes: Bytes,
}

impl Blob {
    pub fn new(media_type: &'static str, bytes: Vec<u8>) -> Self {
        Blob {
            digest: BlobDigest::of(&bytes),
            media_type,
            bytes: Bytes::from(bytes),
        }
    }
}

/// An image: layers, config and manifest.
#[derive(Debug, Clone)]
pub struct Image {
    pub layers: Vec<Blob>,
    pub config: Blob,
    pub manifest: Blob,
}

impl Image {
    /// Builds an image from layer specs; `seed` makes random content differ between images.
    pub fn build(specs: &[LayerSpec], seed: u64) -> Image {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let mut builder = tar::Builder::new(Vec::new());
            let mut add = |name: String, data: &[u8]| {
                let mut header = tar::Header::new_gnu();
                header.set_size(data.len() as u64);
                header.set_mode(0o644);
                header.set_mtime(0);
                header.set_cksum();
                builder
                    .append_data(&mut header, name, data)
                    .expect("tar into memory");
            };
            match spec {
                LayerSpec::Empty => {}
                LayerSpec::Random { size } => {
                    let mut data = vec![0u8; *size];
                    rng.fill_bytes(&mut data);
                    add(format!("layer{i}/random.bin"), &data);
                }
                LayerSpec::Gzip { files } => {
                    for f in 0..*files {
                        let text = format!("file {f} of layer {i}, seed {seed}\n").repeat(100);
                        add(format!("layer{i}/file{f}.txt"), text.as_bytes());
                    }
                }
            }
            let tar = builder.into_inner().expect("tar into memory");
            diff_ids.push(BlobDigest::of(&tar).to_string());
            layers.push(match spec {
                LayerSpec::Gzip { .. } => {
                    let mut gz =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    gz.write_all(&tar).expect("gzip into memory");
                    Blob::new(GZIP_TYPE, gz.finish().expect("gzip into memory"))
                }
                _ => Blob::new(TAR_TYPE, tar),
            });
        }
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/true"], "Labels": {"shoal.seed": seed.to_string()}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config = Blob::new(CONFIG_TYPE, serde_json::to_vec(&config).expect("json"));
        let descriptor = |b: &Blob| serde_json::json!({"mediaType": b.media_type, "digest": b.digest.to_string(), "size": b.bytes.len()});
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": descriptor(&config),
            "layers": layers.iter().map(descriptor).collect::<Vec<_>>(),
        });
        let manifest = Blob::new(MANIFEST_TYPE, serde_json::to_vec(&manifest).expect("json"));
        Image {
            layers,
            config,
            manifest,
        }
    }

    /// Config and layers: the blobs a pull fetches after the manifest.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(&self.layers)
    }

    /// Total bytes of config and layers.
    pub fn blob_bytes(&self) -> u64 {
        self.blobs().map(|b| b.bytes.len() as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_layers_are_as_big_as_asked() {
        let image = Image::build(
            &[
                LayerSpec::random_blob(8 << 20),
                LayerSpec::random_blob(1000),
                LayerSpec::random_blob(0),
            ],
            1,
        );
        let lens: Vec<usize> = image.layers.iter().map(|l| l.bytes.len()).collect();
        // Under the smallest tar, and off the 512-byte blocks, the next size a tar can be.
        assert_eq!(lens, [8 << 20, 1536, 1536]);
        let image = Image::build(&[LayerSpec::random_blob(5000)], 1);
        assert_eq!(image.layers[0].bytes.len(), 5120);
    }

    #[test]
    fn layers_are_valid_archives_and_digests_match() {
        let image = Image::build(
            &[
                LayerSpec::Empty,
                LayerSpec::Random { size: 1 },
                LayerSpec::Gzip { files: 3 },
            ],
            7,
        );
        assert_eq!(image.layers.len(), 3);
        for blob in image.blobs() {
            assert_eq!(blob.digest, BlobDigest::of(&blob.bytes));
        }
        let gz = flate2::read::GzDecoder::new(&image.layers[2].bytes[..]);
        assert_eq!(tar::Archive::new(gz).entries().unwrap().count(), 3);
        let mut one = tar::Archive::new(&image.layers[1].bytes[..]);
        assert_eq!(one.entries().unwrap().next().unwrap().unwrap().size(), 1);
        assert_ne!(
            Image::build(&[LayerSpec::Random { size: 8 }], 1).layers[0].digest,
            Image::build(&[LayerSpec::Random { size: 8 }], 2).layers[0].digest
        );
    }
}

//! shoald's configuration: flags, environment and a TOML file feed one resolved [`Config`],
//! checked completely before any port is bound.
//!
//! Precedence: flag or environment variable, then the `--config` file, then the default.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytesize::ByteSize;
use serde::Deserialize;
use shoal_registry_proxy::{Registry, UpstreamConfig};
use shoal_transport::JoinToken;

use crate::swarm::SwarmConfig;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:65001";
const DEFAULT_DATA_DIR: &str = "/var/lib/shoal";
const DEFAULT_CACHE_SIZE: &str = "20GiB";
const DEFAULT_REGISTRY: &str = "docker.io";
const DEFAULT_CONNECT_TIMEOUT: &str = "5s";
const DEFAULT_HEADER_TIMEOUT: &str = "20s";
const DEFAULT_STALL_TIMEOUT: &str = "20s";
/// Pieces uploaded to peers at once when `--max-upload-peers` is not given. 5 since hash
/// groups (`shoal/7`): `shoal sim`, p50 / S/B with 4 and 5, 1,000 x 1 GiB at 1 Gbit/s
/// 1.27x / 1.23x, 10,000 x 1 GiB 1.33x / 1.31x, 20 x 64 MiB in 2 layers at 50 mbit
/// 1.26x / 1.20x; the lab at that size (`shoal bench scale-out --netns`, two runs each)
/// 1.32x / 1.31x. With 4 slots before, 6 was worse (1.77x against 1.29x).
pub const DEFAULT_MAX_UPLOAD_PEERS: usize = 5;
/// The environment variable that sets `--max-upload-peers`.
pub const MAX_UPLOAD_PEERS_ENV: &str = "SHOAL_MAX_UPLOAD_PEERS";

/// Flags of `shoald` (serving). Every flag is also an environment variable.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeArgs {
    /// Address containerd reaches shoald on (its hosts.toml mirror) [default: 127.0.0.1:65001]
    #[arg(long, env = "SHOAL_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,

    /// Directory of the blob store; complete blobs survive restarts [default: /var/lib/shoal]
    #[arg(long, env = "SHOAL_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Most bytes the store keeps; least recently used blobs are evicted beyond it
    /// (e.g. 512MiB, 20GiB) [default: 20GiB]
    #[arg(long, env = "SHOAL_CACHE_SIZE", value_name = "SIZE")]
    pub cache_size: Option<String>,

    /// Talk plain HTTP, not HTTPS, to this registry (repeatable; HOST[:PORT])
    #[arg(
        long = "insecure-registry",
        env = "SHOAL_INSECURE_REGISTRIES",
        value_delimiter = ',',
        value_name = "HOST[:PORT]"
    )]
    #[serde(default)]
    pub insecure_registries: Vec<String>,

    /// Trust the PEM CA certificate in FILE for this registry (repeatable)
    #[arg(
        long = "registry-ca",
        env = "SHOAL_REGISTRY_CAS",
        value_delimiter = ',',
        value_name = "HOST=FILE"
    )]
    #[serde(default)]
    pub registry_cas: Vec<String>,

    /// Registry for requests that carry no `ns=` parameter [default: docker.io]
    #[arg(long, env = "SHOAL_DEFAULT_REGISTRY", value_name = "HOST")]
    pub default_registry: Option<String>,

    /// Deadline for connecting to a registry [default: 5s]
    #[arg(long, env = "SHOAL_CONNECT_TIMEOUT", value_name = "DURATION")]
    pub connect_timeout: Option<String>,

    /// Deadline for a registry's response headers; past it containerd gets a 504 and falls
    /// back to the registry itself [default: 20s]
    #[arg(long, env = "SHOAL_HEADER_TIMEOUT", value_name = "DURATION")]
    pub header_timeout: Option<String>,

    /// Longest pause in a registry's body before shoald gives up on it; a client whose bytes
    /// stall this long has its connection closed, so containerd retries [default: 20s]
    #[arg(long, env = "SHOAL_STALL_TIMEOUT", value_name = "DURATION")]
    pub stall_timeout: Option<String>,

    /// Supernode to join the swarm through (repeatable; IP:PORT). Without one, shoald
    /// fetches every miss from the registry itself
    #[arg(
        long = "supernode",
        env = "SHOAL_SUPERNODES",
        value_delimiter = ',',
        value_name = "ADDR",
        help_heading = "Swarm"
    )]
    #[serde(default)]
    pub supernodes: Vec<String>,

    /// QUIC address other nodes fetch pieces from; must be an address they can reach
    /// (required with --supernode)
    #[arg(
        long,
        env = "SHOAL_PEER_LISTEN",
        value_name = "IP:PORT",
        help_heading = "Swarm"
    )]
    pub peer_listen: Option<String>,

    /// Zone (or rack) of this node; the supernode prefers parents in the same zone
    #[arg(long, env = "SHOAL_ZONE", value_name = "NAME", help_heading = "Swarm")]
    pub zone: Option<String>,

    /// Join token printed by shoal-supernode (DATA_DIR/join-token there)
    #[arg(
        long,
        env = "SHOAL_JOIN_TOKEN",
        value_name = "TOKEN",
        help_heading = "Swarm"
    )]
    pub join_token: Option<String>,

    /// File holding the join token
    #[arg(
        long,
        env = "SHOAL_JOIN_TOKEN_FILE",
        value_name = "FILE",
        help_heading = "Swarm"
    )]
    pub join_token_file: Option<PathBuf>,

    /// Bytes per second sent to peers, e.g. 50MiB (per second) [default: unlimited]
    #[arg(
        long,
        env = "SHOAL_UPLOAD_RATE",
        value_name = "SIZE",
        help_heading = "Swarm"
    )]
    pub upload_rate: Option<String>,

    /// Bytes per second taken from peers, e.g. 100MiB (per second) [default: unlimited]
    #[arg(
        long,
        env = "SHOAL_DOWNLOAD_RATE",
        value_name = "SIZE",
        help_heading = "Swarm"
    )]
    pub download_rate: Option<String>,

    /// Bytes per second this node's link can send, e.g. 12MB for 100 Mbit/s: with it the
    /// node sends up to 2 pieces beyond --max-upload-peers while its uploads use under 90%
    /// of it (its link has room when some receivers are slow) [default: --upload-rate, else
    /// unknown: no more than --max-upload-peers]
    #[arg(
        long,
        env = "SHOAL_UPLOAD_LINK",
        value_name = "SIZE",
        help_heading = "Swarm"
    )]
    pub upload_link: Option<String>,

    /// Pieces uploaded to peers at once; more requests are told to ask elsewhere [default: 4]
    #[arg(
        long,
        env = MAX_UPLOAD_PEERS_ENV,
        value_name = "N",
        help_heading = "Swarm"
    )]
    pub max_upload_peers: Option<usize>,
}

/// The resolved configuration: every value checked and present.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub cache_size: u64,
    pub default_registry: Registry,
    pub upstream: UpstreamConfig,
    /// Present when shoald takes part in a swarm.
    pub swarm: Option<SwarmConfig>,
}

/// Every problem found in the configuration, reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

impl ServeArgs {
    /// Fills what the flags left unset from `file`.
    fn or(self, file: ServeArgs) -> ServeArgs {
        ServeArgs {
            listen: self.listen.or(file.listen),
            data_dir: self.data_dir.or(file.data_dir),
            cache_size: self.cache_size.or(file.cache_size),
            insecure_registries: or_vec(self.insecure_registries, file.insecure_registries),
            registry_cas: or_vec(self.registry_cas, file.registry_cas),
            default_registry: self.default_registry.or(file.default_registry),
            connect_timeout: self.connect_timeout.or(file.connect_timeout),
            header_timeout: self.header_timeout.or(file.header_timeout),
            stall_timeout: self.stall_timeout.or(file.stall_timeout),
            supernodes: or_vec(self.supernodes, file.supernodes),
            peer_listen: self.peer_listen.or(file.peer_listen),
            zone: self.zone.or(file.zone),
            join_token: self.join_token.or(file.join_token),
            join_token_file: self.join_token_file.or(file.join_token_file),
            max_upload_peers: self.max_upload_peers.or(file.max_upload_peers),
            upload_rate: self.upload_rate.or(file.upload_rate),
            download_rate: self.download_rate.or(file.download_rate),
            upload_link: self.upload_link.or(file.upload_link),
        }
    }
}

fn or_vec(a: Vec<String>, b: Vec<String>) -> Vec<String> {
    if a.is_empty() { b } else { a }
}

impl Config {
    /// Resolves flags (and the TOML file at `config_file`, if given) into a checked config.
    pub fn resolve(args: ServeArgs, config_file: Option<&Path>) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let args = match config_file {
            None => args,
            Some(path) => match read_file(path) {
                Ok(file) => args.or(file),
                Err(e) => {
                    errors.push(e);
                    args
                }
            },
        };

        let swarm = resolve_swarm(&args, &mut errors);
        let listen = check(
            &mut errors,
            args.listen.as_deref().unwrap_or(DEFAULT_LISTEN),
            |s| {
                s.parse::<SocketAddr>()
                    .map_err(|e| format!("--listen {s:?}: {e} (expected IP:PORT)"))
            },
        );
        let data_dir = args
            .data_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let cache_size = check(
            &mut errors,
            args.cache_size.as_deref().unwrap_or(DEFAULT_CACHE_SIZE),
            |s| {
                s.parse::<ByteSize>()
                    .map(|b| b.as_u64())
                    .map_err(|e| format!("--cache-size {s:?}: {e} (expected e.g. 512MiB or 20GiB)"))
            },
        );
        let default_registry = check(
            &mut errors,
            args.default_registry.as_deref().unwrap_or(DEFAULT_REGISTRY),
            |s| {
                s.parse::<Registry>()
                    .map_err(|e| format!("--default-registry: {e}"))
            },
        );
        let insecure: HashSet<Registry> = args
            .insecure_registries
            .iter()
            .filter_map(|s| {
                check(&mut errors, s, |s| {
                    s.parse().map_err(|e| format!("--insecure-registry: {e}"))
                })
            })
            .collect();
        let ca_pem: HashMap<Registry, Vec<u8>> = args
            .registry_cas
            .iter()
            .filter_map(|s| {
                check(
                    &mut errors,
                    s,
                    shoal_registry_proxy::upstream::parse_registry_ca,
                )
            })
            .collect();
        let mut duration = |flag: &str, value: Option<String>, default: &str| {
            let value = value.unwrap_or_else(|| default.to_owned());
            check(&mut errors, &value, |s| {
                humantime::parse_duration(s)
                    .map_err(|e| format!("--{flag} {s:?}: {e} (expected e.g. 5s or 500ms)"))
            })
        };
        let connect_timeout = duration(
            "connect-timeout",
            args.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
        );
        let header_timeout = duration(
            "header-timeout",
            args.header_timeout,
            DEFAULT_HEADER_TIMEOUT,
        );
        let stall_timeout = duration("stall-timeout", args.stall_timeout, DEFAULT_STALL_TIMEOUT);

        match (
            listen,
            cache_size,
            default_registry,
            connect_timeout,
            header_timeout,
            stall_timeout,
        ) {
            (Some(listen), Some(cache_size), Some(default_registry), Some(c), Some(h), Some(s))
                if errors.is_empty() =>
            {
                let upstream = UpstreamConfig {
                    insecure,
                    ca_pem,
                    connect_timeout: c,
                    header_timeout: h,
                    stall_timeout: s,
                };
                Ok(Config {
                    listen,
                    data_dir,
                    cache_size,
                    default_registry,
                    upstream,
                    swarm,
                })
            }
            _ => Err(ConfigErrors(errors)),
        }
    }
}

/// The swarm part of the configuration, if `--supernode` is given.
fn resolve_swarm(args: &ServeArgs, errors: &mut Vec<String>) -> Option<SwarmConfig> {
    if args.supernodes.is_empty() {
        return None;
    }
    let supernodes: Vec<SocketAddr> = args
        .supernodes
        .iter()
        .filter_map(|s| {
            check(errors, s, |s| {
                s.parse()
                    .map_err(|e| format!("--supernode {s:?}: {e} (expected IP:PORT)"))
            })
        })
        .collect();
    let peer_listen = match args.peer_listen.as_deref() {
        None => {
            errors.push(
                "--peer-listen is required with --supernode: the address peers reach this node on"
                    .into(),
            );
            None
        }
        Some(s) => check(errors, s, |s| {
            let addr: SocketAddr = s
                .parse()
                .map_err(|e| format!("--peer-listen {s:?}: {e} (expected IP:PORT)"))?;
            if addr.ip().is_unspecified() {
                return Err(format!(
                    "--peer-listen {s:?}: give the address peers reach this node on, not a wildcard"
                ));
            }
            Ok(addr)
        }),
    };
    let token_text = match (&args.join_token, &args.join_token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(file)) => std::fs::read_to_string(file)
            .map_err(|e| errors.push(format!("--join-token-file {}: {e}", file.display())))
            .ok(),
        (None, None) => {
            errors.push("--join-token or --join-token-file is required with --supernode".into());
            None
        }
    };
    let join_token = token_text.and_then(|t| {
        check(errors, &t, |t| {
            t.parse::<JoinToken>()
                .map_err(|e| format!("join token: {e}"))
        })
    });
    let upload_rate = rate(errors, "upload-rate", args.upload_rate.as_deref());
    let download_rate = rate(errors, "download-rate", args.download_rate.as_deref());
    let upload_link = rate(errors, "upload-link", args.upload_link.as_deref());
    Some(SwarmConfig {
        peer_listen: peer_listen?,
        supernodes,
        zone: args.zone.clone().unwrap_or_default(),
        join_token: join_token?,
        max_upload_peers: args
            .max_upload_peers
            .unwrap_or(DEFAULT_MAX_UPLOAD_PEERS)
            .max(1),
        upload_rate: upload_rate?,
        download_rate: download_rate?,
        upload_link: upload_link.zip(upload_rate).map(
            |(link, rate)| {
                if link > 0 { link } else { rate }
            },
        )?,
    })
}

/// A `--*-rate SIZE` flag in bytes per second; absent is 0 (unlimited).
fn rate(errors: &mut Vec<String>, flag: &str, value: Option<&str>) -> Option<u64> {
    let Some(value) = value else { return Some(0) };
    check(errors, value, |s| {
        s.parse::<ByteSize>()
            .map(|b| b.as_u64())
            .map_err(|e| format!("--{flag} {s:?}: {e} (bytes per second, e.g. 100MiB)"))
    })
}

fn check<T>(
    errors: &mut Vec<String>,
    value: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Option<T> {
    parse(value).map_err(|e| errors.push(e)).ok()
}

fn read_file(path: &Path) -> Result<ServeArgs, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("--config {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn defaults_resolve() {
        let c = Config::resolve(ServeArgs::default(), None).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.cache_size, 20 * 1024 * 1024 * 1024);
        assert_eq!(c.default_registry.as_str(), "docker.io");
        assert_eq!(c.upstream.stall_timeout, Duration::from_secs(20));
    }

    #[test]
    fn reports_every_error_at_once() {
        let args = ServeArgs {
            listen: Some("nowhere".into()),
            cache_size: Some("lots".into()),
            insecure_registries: vec!["bad/host".into()],
            registry_cas: vec!["x.io=/nonexistent/ca.pem".into(), "noequals".into()],
            stall_timeout: Some("forever".into()),
            ..Default::default()
        };
        let err = Config::resolve(args, None).unwrap_err();
        assert_eq!(err.0.len(), 6, "{err}");
        let text = err.to_string();
        for needle in [
            "--listen",
            "--cache-size",
            "--insecure-registry",
            "/nonexistent/ca.pem",
            "HOST=FILE",
            "--stall-timeout",
        ] {
            assert!(text.contains(needle), "{needle} missing in {text}");
        }
    }

    #[test]
    fn swarm_flags_are_checked_together() {
        let args = ServeArgs {
            supernodes: vec!["10.0.0.1:65100".into(), "nope".into()],
            peer_listen: Some("0.0.0.0:65002".into()),
            upload_rate: Some("fast".into()),
            upload_link: Some("12 potatoes".into()),
            ..Default::default()
        };
        let err = Config::resolve(args, None).unwrap_err().to_string();
        for needle in [
            "--supernode \"nope\"",
            "wildcard",
            "--join-token",
            "--upload-rate",
            "--upload-link",
        ] {
            assert!(err.contains(needle), "{needle} missing in {err}");
        }
        let ca = shoal_transport::ClusterCa::generate().unwrap();
        let args = ServeArgs {
            supernodes: vec!["10.0.0.1:65100".into()],
            peer_listen: Some("10.0.0.7:65002".into()),
            join_token: Some(shoal_transport::JoinToken::new(&ca).to_string()),
            download_rate: Some("100MiB".into()),
            ..Default::default()
        };
        let swarm = Config::resolve(args, None).unwrap().swarm.unwrap();
        assert_eq!(swarm.download_rate, 100 << 20);
        assert_eq!(swarm.upload_rate, 0);
        assert_eq!(swarm.upload_link, 0, "unknown");
        let with = |rate: Option<&str>, link: Option<&str>| {
            let args = ServeArgs {
                supernodes: vec!["10.0.0.1:65100".into()],
                peer_listen: Some("10.0.0.7:65002".into()),
                join_token: Some(shoal_transport::JoinToken::new(&ca).to_string()),
                upload_rate: rate.map(Into::into),
                upload_link: link.map(Into::into),
                ..Default::default()
            };
            Config::resolve(args, None)
                .unwrap()
                .swarm
                .unwrap()
                .upload_link
        };
        assert_eq!(with(Some("5MB"), None), 5_000_000, "the rate is the link");
        assert_eq!(with(Some("5MB"), Some("12MB")), 12_000_000);
        assert_eq!(with(None, Some("12MB")), 12_000_000);
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shoald.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:7000\"\ncache-size = \"1GiB\"\ninsecure-registries = [\"localhost:5000\"]\n",
        )
        .unwrap();
        let args = ServeArgs {
            listen: Some("127.0.0.1:8000".into()),
            ..Default::default()
        };
        let c = Config::resolve(args, Some(&file)).unwrap();
        assert_eq!(c.listen.port(), 8000);
        assert_eq!(c.cache_size, 1 << 30);
        assert!(
            c.upstream
                .insecure
                .contains(&"localhost:5000".parse().unwrap())
        );

        std::fs::write(&file, "lisen = \"typo\"\n").unwrap();
        let err = Config::resolve(ServeArgs::default(), Some(&file)).unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
    }
}

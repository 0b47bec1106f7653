//! `shoald configure-containerd`: points containerd at shoald with `hosts.toml` files.
//!
//! For each registry (or `_default` for all), `<config-path>/<registry>/hosts.toml` names
//! shoald as a mirror with `pull` and `resolve`, and keeps the registry itself as `server`,
//! so that containerd falls back to it whenever shoald answers with an error. A different
//! existing file is backed up first; running the command twice changes nothing.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use shoal_registry_proxy::Registry;

use crate::config::DEFAULT_LISTEN;

#[derive(Debug, Clone, clap::Args)]
pub struct ConfigureArgs {
    /// Registry to mirror through shoald (repeatable, e.g. docker.io); none means every
    /// registry (`_default`)
    #[arg(long = "registry", value_name = "HOST[:PORT]")]
    pub registries: Vec<String>,

    /// Registry that containerd reaches over plain HTTP when it falls back (repeatable)
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,

    /// containerd's registry config directory (its `config_path`)
    #[arg(long, default_value = "/etc/containerd/certs.d", value_name = "DIR")]
    pub config_path: PathBuf,

    /// Address shoald listens on (its --listen)
    #[arg(long, env = "SHOAL_LISTEN", default_value = DEFAULT_LISTEN, value_name = "ADDR")]
    pub mirror: String,

    /// containerd's config file, checked for a `config_path` setting
    #[arg(
        long,
        default_value = "/etc/containerd/config.toml",
        value_name = "FILE"
    )]
    pub containerd_config: PathBuf,
}

/// What happened to one `hosts.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Created(PathBuf),
    Unchanged(PathBuf),
    Replaced { path: PathBuf, backup: PathBuf },
}

/// Writes the files and returns what it did, plus advice for containerd's config if needed.
pub fn configure(args: &ConfigureArgs) -> anyhow::Result<(Vec<Outcome>, Option<String>)> {
    let mirror: SocketAddr = args
        .mirror
        .parse()
        .with_context(|| format!("--mirror {:?} is not IP:PORT", args.mirror))?;
    let insecure: Vec<Registry> = args
        .insecure_registries
        .iter()
        .map(|s| {
            s.parse()
                .with_context(|| format!("--insecure-registry {s:?}"))
        })
        .collect::<Result<_, _>>()?;
    let registries: Vec<Option<Registry>> = if args.registries.is_empty() {
        vec![None]
    } else {
        args.registries
            .iter()
            .map(|s| {
                s.parse()
                    .map(Some)
                    .with_context(|| format!("--registry {s:?}"))
            })
            .collect::<Result<_, _>>()?
    };
    let mut outcomes = Vec::new();
    for registry in &registries {
        let dir_name = registry.as_ref().map_or("_default", Registry::as_str);
        let plain = registry.as_ref().is_some_and(|r| insecure.contains(r));
        let text = hosts_toml(registry.as_ref(), plain, mirror);
        outcomes.push(write_file(
            &args.config_path.join(dir_name).join("hosts.toml"),
            &text,
        )?);
    }
    Ok((
        outcomes,
        config_path_advice(&args.containerd_config, &args.config_path),
    ))
}

/// The `hosts.toml` for `registry` (all registries when `None`).
pub fn hosts_toml(registry: Option<&Registry>, plain_http: bool, mirror: SocketAddr) -> String {
    let mut text = String::from(
        "# Written by `shoald configure-containerd`: pull through shoald, fall back to the registry.\n",
    );
    if let Some(registry) = registry {
        let scheme = if plain_http { "http" } else { "https" };
        text.push_str(&format!(
            "server = \"{scheme}://{}\"\n\n",
            registry.api_host()
        ));
    }
    text.push_str(&format!(
        "[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    ));
    text
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<Outcome> {
    let dir = path.parent().expect("hosts.toml has a directory");
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let backup = match fs::read(path) {
        Ok(old) if old == text.as_bytes() => return Ok(Outcome::Unchanged(path.to_owned())),
        Ok(_) => Some(backup_file(path)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    };
    let tmp = path.with_extension("toml.shoal-tmp");
    fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(match backup {
        Some(backup) => Outcome::Replaced {
            path: path.to_owned(),
            backup,
        },
        None => Outcome::Created(path.to_owned()),
    })
}

/// Copies `path` to the first free `hosts.toml.bak[.N]` next to it.
fn backup_file(path: &Path) -> anyhow::Result<PathBuf> {
    for n in 0..1000 {
        let suffix = if n == 0 {
            "toml.bak".to_owned()
        } else {
            format!("toml.bak.{n}")
        };
        let backup = path.with_extension(suffix);
        if !backup.exists() {
            fs::copy(path, &backup)
                .with_context(|| format!("cannot back up {}", path.display()))?;
            return Ok(backup);
        }
    }
    bail!(
        "too many backups of {} already; remove some",
        path.display()
    )
}

/// The line to add to containerd's config, unless it already sets `config_path`.
fn config_path_advice(containerd_config: &Path, config_path: &Path) -> Option<String> {
    let text = fs::read_to_string(containerd_config).unwrap_or_default();
    let set = text
        .lines()
        .any(|l| l.trim_start().starts_with("config_path"));
    (!set).then(|| {
        format!(
            "containerd does not read these files yet. Add to {} and restart containerd:\n\n\
             [plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}\"\n",
            containerd_config.display(),
            config_path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path, registries: &[&str]) -> ConfigureArgs {
        ConfigureArgs {
            registries: registries.iter().map(|s| s.to_string()).collect(),
            insecure_registries: vec!["127.0.0.1:5000".into()],
            config_path: dir.join("certs.d"),
            mirror: "127.0.0.1:65001".into(),
            containerd_config: dir.join("config.toml"),
        }
    }

    #[test]
    fn writes_backs_up_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let a = args(dir.path(), &["docker.io", "127.0.0.1:5000"]);
        let hub = dir.path().join("certs.d/docker.io/hosts.toml");
        fs::create_dir_all(hub.parent().unwrap()).unwrap();
        fs::write(&hub, "server = \"https://mine\"\n").unwrap();

        let (outcomes, advice) = configure(&a).unwrap();
        assert!(
            matches!(&outcomes[0], Outcome::Replaced { backup, .. } if fs::read_to_string(backup).unwrap() == "server = \"https://mine\"\n")
        );
        assert!(matches!(&outcomes[1], Outcome::Created(_)));
        let text = fs::read_to_string(&hub).unwrap();
        assert!(text.contains("server = \"https://registry-1.docker.io\""));
        assert!(text.contains(
            "[host.\"http://127.0.0.1:65001\"]\n  capabilities = [\"pull\", \"resolve\"]"
        ));
        let local =
            fs::read_to_string(dir.path().join("certs.d/127.0.0.1:5000/hosts.toml")).unwrap();
        assert!(local.contains("server = \"http://127.0.0.1:5000\""));
        assert!(advice.unwrap().contains("config_path"));

        let (again, _) = configure(&a).unwrap();
        assert!(again.iter().all(|o| matches!(o, Outcome::Unchanged(_))));
        fs::write(dir.path().join("config.toml"), "  config_path = \"/x\"\n").unwrap();
        assert_eq!(configure(&a).unwrap().1, None);
    }

    #[test]
    fn default_mirrors_everything_and_bad_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        configure(&args(dir.path(), &[])).unwrap();
        let text = fs::read_to_string(dir.path().join("certs.d/_default/hosts.toml")).unwrap();
        assert!(!text.contains("server ="));
        assert!(configure(&args(dir.path(), &["../etc"])).is_err());
        let mut bad = args(dir.path(), &[]);
        bad.mirror = "nope".into();
        assert!(configure(&bad).is_err());
    }
}

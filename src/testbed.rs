//! Real parts for end-to-end tests and benchmarks: the CNCF registry (`docker-registry`),
//! containerd with `ctr`, and the `shoald` binary, each a child process on loopback with its
//! own directory. A missing tool fails loudly: run `scripts/install-test-deps.sh`.

use std::io::{Read as _, Seek as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use shoal_proto::BlobDigest;

/// Generous bound for anything that should take seconds: it only catches hangs.
pub const HANG: Duration = Duration::from_secs(300);

/// The Debian package that installs `tool`.
fn package(tool: &str) -> &str {
    match tool {
        "htpasswd" => "apache2-utils",
        "ctr" => "containerd",
        "ip" | "tc" => "iproute2",
        "aria2c" => "aria2",
        other => other,
    }
}

/// The path of `tool`, or an error that says how to install it.
pub fn find_tool(tool: &str) -> anyhow::Result<PathBuf> {
    which::which(tool).with_context(|| {
        format!(
            "`{tool}` is not installed: apt-get install {}, or run \
             scripts/install-test-deps.sh (as root), which installs every tool",
            package(tool)
        )
    })
}

/// The path of a tool the tests need, or a loud failure that says how to get it.
pub fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `ready` until it holds, failing after `within`.
pub fn wait_until(what: &str, within: Duration, ready: impl FnMut() -> bool) {
    assert!(
        ready_within(within, ready),
        "{what} not ready after {within:?}"
    );
}

/// Polls `ready` every 50 ms; false when it did not hold within `within`.
fn ready_within(within: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while !ready() {
        if started.elapsed() >= within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

fn http_ok(url: &str) -> bool {
    reqwest::blocking::Client::new()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .is_ok_and(|r| r.status().is_success() || r.status() == 401)
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc(pub Child);

impl Proc {
    /// Starts `cmd` with stdin closed and its output going to `log`.
    pub fn spawn_logged(mut cmd: Command, log: &Path) -> anyhow::Result<Proc> {
        let out = std::fs::File::create(log)?;
        let what = format!("{:?}", cmd.get_program());
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        Ok(Proc(child))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real CNCF registry.
pub struct Registry {
    pub addr: String,
    log: PathBuf,
    _proc: Proc,
}

impl Registry {
    /// Starts `docker-registry` in `dir`; with `users`, behind htpasswd basic auth.
    pub fn start(dir: &Path, users: &[(&str, &str)]) -> Registry {
        Self::try_start(dir, users).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Like [`Registry::start`], with an error instead of a panic (for the benches).
    pub fn try_start(dir: &Path, users: &[(&str, &str)]) -> anyhow::Result<Registry> {
        Self::try_start_at(dir, users, &format!("127.0.0.1:{}", free_port()), &[])
    }

    /// Like [`Registry::try_start`], listening on `addr`, the command run through `wrap`
    /// (e.g. `ip netns exec NAME`).
    pub fn try_start_at(
        dir: &Path,
        users: &[(&str, &str)],
        addr: &str,
        wrap: &[&str],
    ) -> anyhow::Result<Registry> {
        let bin = find_tool("docker-registry")?;
        let addr = addr.to_owned();
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let storage = dir.join("registry");
        let mut auth = String::new();
        if !users.is_empty() {
            let htpasswd = dir.join("htpasswd");
            let mut lines = String::new();
            for (user, password) in users {
                let out = Command::new(find_tool("htpasswd")?)
                    .args(["-Bbn", user, password])
                    .output()
                    .context("running htpasswd")?;
                anyhow::ensure!(out.status.success(), "htpasswd failed for {user}");
                lines.push_str(String::from_utf8_lossy(&out.stdout).trim());
                lines.push('\n');
            }
            std::fs::write(&htpasswd, lines)?;
            auth = format!(
                "auth: {{htpasswd: {{realm: shoal-test, path: {}}}}}\n",
                htpasswd.display()
            );
        }
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: info, accesslog: {{disabled: false}}}}\n\
                 storage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\n\
                 http: {{addr: {addr}}}\n{auth}",
                storage.display()
            ),
        )?;
        let log = dir.join("registry.log");
        let out = std::fs::File::create(&log)?;
        let mut command = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let child = command
            .arg("serve")
            .arg(&config)
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let proc = Proc(child);
        let url = format!("http://{addr}/v2/");
        if !ready_within(Duration::from_secs(20), || http_ok(&url)) {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = said.lines().rev().take(5).collect();
            anyhow::bail!(
                "docker-registry did not answer {url} within 20 s; the end of {}:\n{}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(Registry {
            addr,
            log,
            _proc: proc,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many blob GETs for `digest` the registry answered with a body (access log).
    pub fn blob_gets(&self, digest: &BlobDigest) -> usize {
        let needle = format!("/blobs/{digest}");
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"GET ") && l.contains(&needle))
            .filter(|l| l.contains("HTTP/1.1\" 200 ") || l.contains("HTTP/1.1\" 206 "))
            .count()
    }

    /// Blob bytes the registry sent (status 200 or 206 to a blob GET), from its access log.
    pub fn blob_bytes_sent(&self) -> u64 {
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"GET ") && l.contains("/blobs/sha256:"))
            .filter_map(|l| {
                let after = l.split("HTTP/1.1\" ").nth(1)?;
                let mut fields = after.split_whitespace();
                let status = fields.next()?;
                let bytes: u64 = fields.next()?.parse().ok()?;
                matches!(status, "200" | "206").then_some(bytes)
            })
            .sum()
    }

    /// Every blob GET the registry answered with a body.
    pub fn all_blob_gets(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"GET ") && l.contains("/blobs/sha256:"))
            .filter(|l| l.contains("HTTP/1.1\" 200 ") || l.contains("HTTP/1.1\" 206 "))
            .count()
    }
}

/// A binary built from this workspace: next to the running executable, or one level up
/// (where test binaries live).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let candidates = [dir.join(name), dir.parent().unwrap().join(name)];
    let found = candidates.iter().find(|p| p.is_file()).cloned();
    found.unwrap_or_else(|| {
        panic!(
            "{name} is not built next to {}: run cargo build --workspace --bins",
            exe.display()
        )
    })
}

/// The `shoald` binary.
pub fn shoald_bin() -> PathBuf {
    workspace_bin("shoald")
}

/// A running `shoal-supernode` process.
pub struct SupernodeProc {
    /// QUIC (and join) address.
    pub addr: String,
    pub api: String,
    pub join_token: String,
    _proc: Proc,
}

impl SupernodeProc {
    /// Starts a supernode with its data in `dir`, seeding from `registry` over plain HTTP.
    pub fn start(dir: &Path, registry: &str) -> SupernodeProc {
        Self::start_with(dir, registry, &[])
    }

    /// As [`SupernodeProc::start`], with more flags (`--stripes 2`).
    pub fn start_with(dir: &Path, registry: &str, flags: &[&str]) -> SupernodeProc {
        let addr = format!("127.0.0.1:{}", free_port());
        let api = format!("127.0.0.1:{}", free_port());
        std::fs::create_dir_all(dir).unwrap();
        let log = std::fs::File::create(dir.join("supernode.log")).unwrap();
        let child = Command::new(workspace_bin("shoal-supernode"))
            .args([
                "--listen",
                &addr,
                "--api-listen",
                &api,
                "--insecure-registry",
                registry,
            ])
            .args(flags)
            .arg("--data-dir")
            .arg(dir)
            .env("SHOAL_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("shoal-supernode starts");
        let proc = Proc(child);
        wait_until("shoal-supernode", Duration::from_secs(20), || {
            http_ok(&format!("http://{api}/healthz"))
        });
        let join_token = std::fs::read_to_string(dir.join("join-token"))
            .unwrap()
            .trim()
            .to_owned();
        SupernodeProc {
            addr,
            api,
            join_token,
            _proc: proc,
        }
    }

    /// shoald flags that join this supernode's swarm.
    pub fn shoald_args(&self) -> Vec<String> {
        let peer = format!("127.0.0.1:{}", free_port());
        [
            "--supernode",
            &self.addr,
            "--peer-listen",
            &peer,
            "--join-token",
            &self.join_token,
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// SIGKILL, as a crash would (dropping does the same).
    pub fn kill9(self) {
        drop(self);
    }
}

/// A running shoald.
pub struct Shoald {
    pub addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    proc: Proc,
}

impl Shoald {
    /// Starts shoald with its store in `data_dir` and the extra `args`.
    pub fn start(data_dir: &Path, args: &[&str]) -> Shoald {
        let addr = format!("127.0.0.1:{}", free_port());
        let log = data_dir.with_extension("log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(shoald_bin())
            .args(["--listen", &addr, "--data-dir", data_dir.to_str().unwrap()])
            .args(args)
            .env("SHOAL_LOG", "info")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("shoald starts");
        let proc = Proc(child);
        wait_until("shoald", Duration::from_secs(20), || {
            http_ok(&format!("http://{addr}/healthz"))
        });
        Shoald {
            addr,
            data_dir: data_dir.to_owned(),
            log,
            proc,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(self) {
        drop(self.proc);
    }

    /// The process id, to read its memory use from /proc.
    pub fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    pub fn metrics(&self) -> String {
        reqwest::blocking::get(format!("{}/metrics", self.url()))
            .unwrap()
            .text()
            .unwrap()
    }

    /// Checks that every complete blob in the store hashes to its name; returns how many.
    pub fn verify_store(data_dir: &Path) -> usize {
        let dir = data_dir.join("blobs/sha256");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            let bytes = std::fs::read(entry.path()).unwrap();
            assert_eq!(
                BlobDigest::of(&bytes).hex(),
                name,
                "store holds a corrupt blob"
            );
            n += 1;
        }
        n
    }
}

/// containerd with its own root, state and socket, and `ctr` to drive it.
pub struct Containerd {
    pub socket: PathBuf,
    _proc: Proc,
}

impl Containerd {
    pub fn start(dir: &Path) -> Containerd {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("containerd.toml");
        std::fs::write(
            &config,
            "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
        )
        .unwrap();
        let socket = dir.join("c.sock");
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new(tool("containerd"))
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--state")
            .arg(dir.join("state"))
            .arg("--address")
            .arg(&socket)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd starts");
        let proc = Proc(child);
        let c = Containerd {
            socket,
            _proc: proc,
        };
        wait_until("containerd", Duration::from_secs(30), || {
            c.ctr_output(&["version"]).0
        });
        c
    }

    /// Runs `ctr --address SOCKET args…` (bounded by [`HANG`]): (success, stdout + stderr).
    pub fn ctr_output(&self, args: &[&str]) -> (bool, String) {
        // Output goes to a file, not a pipe: ctr prints progress all along, and a pipe
        // nobody reads while it runs fills up and blocks it.
        let mut out = tempfile::tempfile().expect("a temporary file for ctr's output");
        let mut child = Command::new(tool("ctr"))
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .stdout(out.try_clone().unwrap())
            .stderr(out.try_clone().unwrap())
            .spawn()
            .expect("ctr runs");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut text = String::new();
                out.seek(std::io::SeekFrom::Start(0)).unwrap();
                out.read_to_string(&mut text).unwrap();
                return (status.success(), text);
            }
            if started.elapsed() > HANG {
                let _ = child.kill();
                panic!("ctr {args:?} hung for {HANG:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `ctr images pull` through the hosts.toml files in `hosts_dir`; panics on failure.
    pub fn pull(&self, hosts_dir: &Path, image: &str, user: Option<&str>) -> String {
        let mut args = vec!["images", "pull", "--hosts-dir", hosts_dir.to_str().unwrap()];
        if let Some(user) = user {
            args.extend(["--user", user]);
        }
        args.push(image);
        let (ok, out) = self.ctr_output(&args);
        assert!(ok, "ctr pull {image} failed:\n{out}");
        out
    }
}

/// Writes hosts.toml for `registry` via `shoald configure-containerd`; returns the hosts dir.
pub fn configure_containerd(dir: &Path, registry: &str, shoald: &Shoald) -> PathBuf {
    let hosts = dir.join("certs.d");
    let out = Command::new(shoald_bin())
        .args([
            "configure-containerd",
            "--registry",
            registry,
            "--insecure-registry",
            registry,
        ])
        .args([
            "--mirror",
            &shoald.addr,
            "--config-path",
            hosts.to_str().unwrap(),
        ])
        .args([
            "--containerd-config",
            dir.join("no-config.toml").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "configure-containerd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    hosts
}

//! `shoal bench scale-out` as a benchmarker runs it: the `shoal` binary, a real swarm of
//! processes, the real `docker-registry` (or, with nothing installed, the embedded origin).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Runs the bench; returns its JSON and the pid of the `shoal` process.
fn scale_out(dir: &Path, path_env: Option<&str>, extra: &[&str]) -> (serde_json::Value, u32) {
    let json = dir.join("run.json");
    let report = dir.join("report");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shoal"));
    cmd.args([
        "bench",
        "scale-out",
        "--nodes",
        "3",
        "--image-size",
        "16MiB",
        "--layers",
        "2",
        "--json",
    ])
    .arg(&json)
    .arg("--report")
    .arg(&report)
    .args(extra);
    if let Some(path) = path_env {
        cmd.env("PATH", path);
    }
    let mut child = cmd.spawn().expect("shoal runs");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("shoal bench scale-out did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "shoal bench scale-out failed: {status}");
    let html = std::fs::read_to_string(report.join("index.html")).unwrap();
    assert_eq!(html.matches("<svg").count(), 2, "the report has both plots");
    let run = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    (run, child.id())
}

fn check(run: &serde_json::Value) {
    assert_eq!(run["mode"], "loopback");
    assert_eq!(run["nodes"], 3);
    assert_eq!(run["failures"], 0, "{run:#}");
    assert_eq!(run["node_completion_s"].as_array().unwrap().len(), 3);
    let ratio = run["registry_egress_ratio"].as_f64().unwrap();
    assert!(
        (0.99..=1.05).contains(&ratio),
        "the swarm took the image from the registry about once, not {ratio}x: {run:#}"
    );
    let from_swarm = run["peer_bytes"].as_u64().unwrap() + run["seed_bytes"].as_u64().unwrap();
    assert!(from_swarm > 0, "{run:#}");
    let direct = &run["baselines"]["direct"];
    assert_eq!(direct["failures"], 0);
    let direct_ratio = direct["registry_egress_ratio"].as_f64().unwrap();
    assert!(
        (2.99..=3.1).contains(&direct_ratio),
        "without shoal each node pulls from the registry: {direct_ratio}x"
    );
}

#[test]
fn a_swarm_of_processes_takes_the_image_from_docker_registry_once() {
    // The run uses docker-registry when installed: make sure it is.
    shoal::testbed::tool("docker-registry");
    let dir = tempfile::tempdir().unwrap();
    check(&scale_out(dir.path(), None, &[]).0);
}

#[test]
fn with_nothing_installed_the_embedded_origin_serves_the_image() {
    let dir = tempfile::tempdir().unwrap();
    check(&scale_out(dir.path(), Some("/nonexistent"), &[]).0);
}

#[test]
fn in_namespaces_the_caps_hold_the_registry_sends_the_image_once_and_bittorrent_runs() {
    shoal::testbed::tool("docker-registry");
    shoal::testbed::tool("tc");
    let dir = tempfile::tempdir().unwrap();
    let (run, pid) = scale_out(
        dir.path(),
        None,
        &[
            "--netns",
            "--bandwidth",
            "50mbit",
            "--baseline",
            "direct,bittorrent",
            "--cross-check",
        ],
    );
    assert_eq!(run["mode"], "netns");
    assert_eq!(run["failures"], 0, "{run:#}");
    let bound = run["lower_bound_s"].as_f64().unwrap();
    let image = run["image_bytes"].as_f64().unwrap();
    assert!((bound - image / 6_250_000.0).abs() < 1e-6, "S/B at 50 mbit");
    // No node beats its own link: if one did, the caps are not in place.
    for t in run["node_completion_s"].as_array().unwrap() {
        assert!(
            t.as_f64().unwrap() >= 0.9 * bound,
            "{t} s beat S/B = {bound} s"
        );
    }
    let ratio = run["registry_egress_ratio"].as_f64().unwrap();
    assert!((0.99..=1.05).contains(&ratio), "registry sent {ratio}x");
    // The same swarm in the sim, given the round trips measured: it ran and says so.
    let cross = &run["cross_check"];
    assert!(
        cross["command"]
            .as_str()
            .unwrap()
            .starts_with("shoal sim --nodes 3 "),
        "{cross:#}"
    );
    let sim_egress = cross["sim_registry_egress_ratio"].as_f64().unwrap();
    assert!((0.99..=1.05).contains(&sim_egress), "{cross:#}");
    assert!(
        cross["sim_p50_over_bound"].as_f64().unwrap() >= 1.0,
        "{cross:#}"
    );
    assert!(
        cross["p50_apart"].as_f64().unwrap().is_finite(),
        "{cross:#}"
    );
    // The supernode's link counters hold what it is known to have sent and received:
    // its seed's pieces and its answers out, the image from the registry in (each with
    // the packets around them on top), and the cross-check compares the model's.
    let bytes = |field: &str| {
        run[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field}: {run:#}"))
    };
    let sent = bytes("supernode_sent_bytes");
    let counted = bytes("seed_bytes") + bytes("supernode_answer_bytes");
    assert!(
        sent >= counted && sent < 2 * counted + (1 << 20),
        "sent {sent} B for {counted} B of pieces and answers"
    );
    let received = bytes("supernode_received_bytes");
    assert!(
        received as f64 >= 0.99 * image,
        "received {received} B of a {image} B image"
    );
    assert!(
        cross["supernode_sent_apart"].as_f64().unwrap().is_finite(),
        "{cross:#}"
    );
    // The nodes measured their peers and their supernode.
    for field in ["peer_answer_s", "peer_rtt_s", "supernode_rtt_s"] {
        let s = run[field].as_f64().unwrap_or(-1.0);
        assert!(s > 0.0 && s < 10.0, "{field} = {s}: {run:#}");
    }
    // Direct: three nodes share the registry's one capped link.
    let direct = &run["baselines"]["direct"];
    assert_eq!(direct["failures"], 0);
    let direct_max = direct["completion_s"]["max"].as_f64().unwrap();
    assert!(direct_max >= 0.9 * 3.0 * bound, "direct max {direct_max} s");
    // BitTorrent: every node completes, under the same caps.
    let bt = &run["baselines"]["bittorrent"];
    assert_eq!(bt["failures"], 0, "{bt:#}");
    for t in bt["node_completion_s"].as_array().unwrap() {
        assert!(
            t.as_f64().unwrap() >= 0.9 * bound,
            "bittorrent {t} s beat S/B"
        );
    }
    // Namespaces are gone afterwards.
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let names = String::from_utf8_lossy(&left.stdout).to_string();
    let ours = format!("shoal{pid}-");
    assert!(
        !names.lines().any(|l| l.starts_with(&ours)),
        "namespaces left behind: {names}"
    );
}

/// Whether process `pid` still runs (a zombie waiting to be reaped does not).
fn runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|s| !s.trim().starts_with('Z'))
    })
}

#[test]
fn a_node_dies_with_the_bench_that_started_it() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let shoal = env!("CARGO_BIN_EXE_shoal");
    let node = |data: &str| {
        format!(
            "{shoal} __supernode --listen 127.0.0.1:0 --api-listen 127.0.0.1:0 --data-dir {}",
            dir.path().join(data).display()
        )
    };
    // A stand-in for the bench: a shell that starts a node naming itself as its bench, as
    // the bench does, says the node's pid and waits.
    let script = format!(
        "SHOAL_BENCH_PID=$$ {} 2>/dev/null & echo $!; wait",
        node("a")
    );
    let mut bench = Command::new("sh")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(bench.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid: u32 = line.trim().parse().expect("the node's pid");
    std::thread::sleep(Duration::from_millis(500));
    assert!(runs(pid), "the node started");
    // SIGKILL: the bench cannot stop its nodes; the kernel does.
    bench.kill().unwrap();
    bench.wait().unwrap();
    all_gone_within_10s(dir.path());

    // A node whose bench is already gone stops at once, saying why.
    let out = Command::new("sh")
        .args(["-c", &format!("SHOAL_BENCH_PID=1 {}", node("b"))])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("is gone"), "{said}");
}

/// Waits until no process mentions `dir` (their bench was killed); after 10 s, kills
/// those left and fails naming them.
fn all_gone_within_10s(dir: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_under(dir, std::process::id());
        if left.is_empty() {
            return;
        }
        if std::time::Instant::now() > deadline {
            for (pid, _) in &left {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
            panic!("processes outlived their bench by 10 s: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Processes (other than `except`) whose command line mentions `dir`.
fn processes_under(dir: &Path, except: u32) -> Vec<(u32, String)> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != except && runs(pid))
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&dir).then_some((pid, cmdline))
        })
        .collect()
}

#[test]
fn the_swarm_and_its_registry_die_with_a_killed_bench() {
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("keep");
    let mut bench = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args([
            "bench",
            "scale-out",
            "--nodes",
            "3",
            "--image-size",
            "256MiB",
        ])
        .args(["--baseline", "", "--keep"])
        .arg(&keep)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The registry, the supernode and three nodes.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let started = loop {
        let found = processes_under(&keep, bench.id());
        if found.len() >= 5 {
            break found;
        }
        if std::time::Instant::now() > deadline || bench.try_wait().unwrap().is_some() {
            let _ = bench.kill();
            panic!("the swarm did not start within 60 s: {found:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        started.iter().any(|(_, c)| c.contains("docker-registry")),
        "the bench runs the real docker-registry (scripts/test.sh installs it): {started:?}"
    );
    // SIGKILL: the bench cannot stop anything; the kernel does.
    bench.kill().unwrap();
    bench.wait().unwrap();
    all_gone_within_10s(&keep);
}

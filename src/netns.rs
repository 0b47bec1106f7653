//! Many hosts on one machine: a network namespace per host, all on one bridge in a hub
//! namespace, each with upload and download capped by `tbf` on both ends of its veth (see
//! TESTBED.md). The machine itself reaches every host over an uncapped control link, for
//! health checks, pushes and metrics only. Everything is removed when the [`Lab`] is
//! dropped, also after an error or Ctrl-C (the caller returns, the lab drops).

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, bail};

mod claim;

pub struct Lab {
    prefix: String,
    hub: String,
    hosts: usize,
    control: String,
    /// The private /16 the lab's hosts live in (only inside the lab's namespaces and on its
    /// control link); dropped after the lab is removed.
    range: claim::Range,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Bytes each capped link lets through at line rate before the cap holds (`tbf`'s bucket).
pub const BURST_BYTES: u64 = 256 << 10;

fn tc_cap(ns: &str, dev: &str, bytes_per_s: u64) -> anyhow::Result<()> {
    let rate = format!("{}bit", bytes_per_s * 8);
    ip(&[
        "netns",
        "exec",
        ns,
        "tc",
        "qdisc",
        "add",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        &rate,
        "burst",
        &BURST_BYTES.to_string(),
        "latency",
        "50ms",
    ])
}

/// The kernel's neighbour (ARP) table is shared by every network namespace, and an entry
/// beyond `gc_thresh3` (1,024 by default) cannot be created: the packet that needed it is
/// dropped (`NEIGH_CREATEFAIL` in `skb:kfree_skb`), and for a QUIC peer that is a lost
/// handshake. A lab whose hosts all talk to each other needs about hosts² entries (40
/// hosts: 1,700): the limits are raised, never lowered, before the hosts exist.
fn make_neighbour_room(hosts: usize) -> anyhow::Result<()> {
    // With room for the machine's own entries.
    let need = (hosts + 2) * (hosts + 2) + 256;
    for (name, value) in [("gc_thresh2", need), ("gc_thresh3", 2 * need)] {
        let path = format!("/proc/sys/net/ipv4/neigh/default/{name}");
        let now: usize = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {path}"))?
            .trim()
            .parse()
            .with_context(|| format!("{path} is not a number"))?;
        if now < value {
            std::fs::write(&path, value.to_string())
                .with_context(|| format!("raising {path} to {value}"))?;
            eprintln!(
                "netns: raised net.ipv4.neigh.default.{name} from {now} to {value} so that \
                 {hosts} hosts can reach each other (the neighbour table is shared by all \
                 namespaces)"
            );
        }
    }
    Ok(())
}

impl Lab {
    /// `hosts` namespaces capped at `bytes_per_s` each way. Root only.
    pub fn create(hosts: usize, bytes_per_s: u64) -> anyhow::Result<Lab> {
        let uid = Command::new("id").arg("-u").output()?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            bail!("--netns creates network namespaces: run as root");
        }
        if hosts > 60_000 {
            bail!("a lab holds at most 60,000 hosts");
        }
        claim::remove_dead_labs();
        let range = claim::claim()?;
        make_neighbour_room(hosts)?;
        let prefix = format!("shoal{}", std::process::id());
        let mut lab = Lab {
            hub: format!("{prefix}-hub"),
            control: format!("{prefix}c"),
            prefix,
            hosts: 0,
            range,
        };
        ip(&["netns", "add", &lab.hub])?;
        ip(&["-n", &lab.hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &lab.hub, "link", "set", "br0", "up"])?;
        // The control link: this machine <-> the bridge, uncapped.
        ip(&[
            "link",
            "add",
            &lab.control,
            "type",
            "veth",
            "peer",
            "name",
            "ctl",
            "netns",
            &lab.hub,
        ])?;
        ip(&["-n", &lab.hub, "link", "set", "ctl", "master", "br0"])?;
        ip(&["-n", &lab.hub, "link", "set", "ctl", "up"])?;
        let control_addr = format!("10.{}.255.254/16", lab.range.octet);
        ip(&["addr", "add", &control_addr, "dev", &lab.control])?;
        ip(&["link", "set", &lab.control, "up"])?;
        for k in 0..hosts {
            let ns = lab.ns(k);
            let (veth, hub_side) = (format!("{}-{k}", lab.prefix), format!("v{k}"));
            ip(&["netns", "add", &ns])?;
            lab.hosts = k + 1;
            ip(&[
                "link", "add", &veth, "netns", &ns, "type", "veth", "peer", "name", &hub_side,
                "netns", &lab.hub,
            ])?;
            ip(&["-n", &ns, "link", "set", &veth, "name", "eth0"])?;
            let addr = format!("{}/16", lab.addr(k));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &lab.hub, "link", "set", &hub_side, "master", "br0"])?;
            ip(&["-n", &lab.hub, "link", "set", &hub_side, "up"])?;
            tc_cap(&ns, "eth0", bytes_per_s)?; // upload
            tc_cap(&lab.hub, &hub_side, bytes_per_s)?; // download
        }
        Ok(lab)
    }

    /// The namespace of host `k`.
    pub fn ns(&self, k: usize) -> String {
        format!("{}-{k}", self.prefix)
    }

    /// The address of host `k`.
    pub fn addr(&self, k: usize) -> Ipv4Addr {
        let n = k + 2;
        Ipv4Addr::new(10, self.range.octet, (n / 250) as u8, (n % 250) as u8)
    }

    /// The command prefix that runs a program in host `k`'s namespace.
    pub fn wrap(&self, k: usize) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.ns(k)]
    }

    /// A command that runs `program` in host `k`'s namespace.
    pub fn command(&self, k: usize, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(k)]).arg(program);
        cmd
    }

    /// Bytes host `k` has sent on its link so far.
    pub fn tx_bytes(&self, k: usize) -> u64 {
        self.link_bytes(k).0
    }

    /// Bytes host `k` has sent and received on its link so far (everything on the wire:
    /// payload, packet headers, acknowledgements); 0 when they cannot be read.
    pub fn link_bytes(&self, k: usize) -> (u64, u64) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(k), "cat"])
            .args([
                "/sys/class/net/eth0/statistics/tx_bytes",
                "/sys/class/net/eth0/statistics/rx_bytes",
            ])
            .output()
            .ok();
        let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        let mut counts = text
            .iter()
            .flat_map(|t| t.split_whitespace())
            .map(|w| w.parse().unwrap_or(0));
        (counts.next().unwrap_or(0), counts.next().unwrap_or(0))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = ip(&["link", "delete", &self.control]);
        for k in 0..self.hosts {
            let _ = ip(&["netns", "delete", &self.ns(k)]);
        }
        let _ = ip(&["netns", "delete", &self.hub]);
    }
}

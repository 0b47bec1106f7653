//! Which private /16 a lab lives in, and the labs that died without removing themselves.
//!
//! Labs may run side by side (two benches, a bench and the tests). Each holds an exclusive
//! lock on its range's lock file for as long as it lives, so two labs never route the same
//! range, and the kernel drops the lock however the process ends. A process killed with
//! SIGKILL cannot remove its lab: its namespaces, its control link (a route in this
//! machine's table) and its children stay behind, and are removed before a new lab is made.

use std::fs::File;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, bail};

use super::ip;

/// Where the lock files live (root only, like the labs).
const LOCK_DIR: &str = "/run/shoal";

/// The lab ranges tried, in order: 10.77.0.0/16 to 10.126.0.0/16.
const OCTETS: std::ops::RangeInclusive<u8> = 77..=126;

/// A range held by this process: `10.{octet}.0.0/16`.
pub struct Range {
    pub octet: u8,
    _lock: File,
}

/// The first range that no other lab holds and this machine does not route already.
pub fn claim() -> anyhow::Result<Range> {
    std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
    for octet in OCTETS {
        let path = format!("{LOCK_DIR}/netns-10.{octet}.lock");
        let lock = File::create(&path).with_context(|| format!("creating {path}"))?;
        if lock.try_lock().is_err() {
            continue; // another lab lives there
        }
        if routed(octet)? {
            continue; // a network of this machine uses it
        }
        return Ok(Range { octet, _lock: lock });
    }
    bail!(
        "every range from 10.{}.0.0/16 to 10.{}.0.0/16 is in use by another lab or by this \
         machine's networks; wait for other `shoal bench --netns` runs to finish",
        OCTETS.start(),
        OCTETS.end()
    )
}

/// Whether this machine already has a route into `10.{octet}.0.0/16` (other than the default).
fn routed(octet: u8) -> anyhow::Result<bool> {
    let net = format!("10.{octet}.0.0/16");
    let mut lines = String::new();
    for selector in ["root", "match"] {
        let out = Command::new("ip")
            .args(["-4", "-o", "route", "show", selector, &net])
            .output()
            .context("running `ip route` (iproute2)")?;
        lines.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    Ok(lines
        .lines()
        .any(|l| !l.trim().is_empty() && !l.starts_with("default")))
}

/// The process id in a lab object's name (`shoal{pid}-…` or `shoal{pid}c`).
fn owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("shoal")?;
    let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let tail = &rest[digits..];
    if digits == 0 || !(tail.starts_with('-') || tail == "c") {
        return None;
    }
    rest[..digits].parse().ok()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes the namespaces, control links and leftover processes of labs whose process is
/// gone. Best effort: a lab that cannot be removed is reported, not fatal (the range lock
/// keeps a new lab out of its way).
pub fn remove_dead_labs() {
    let list = |args: &[&str]| -> String {
        Command::new("ip")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let mut removed = std::collections::BTreeSet::new();
    for line in list(&["netns", "list"]).lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = owner(ns).filter(|&pid| !alive(pid)) else {
            continue;
        };
        for child in list(&["netns", "pids", ns]).split_whitespace() {
            let _ = Command::new("kill").args(["-9", child]).output();
        }
        if let Err(e) = ip(&["netns", "delete", ns]) {
            eprintln!("netns: could not remove {ns}, left by process {pid}: {e:#}");
        }
        removed.insert(pid);
    }
    for line in list(&["-o", "link", "show"]).lines() {
        // "7: shoal123c@if6: <...>"
        let Some(name) = line.split(": ").nth(1).and_then(|n| n.split('@').next()) else {
            continue;
        };
        let Some(pid) = owner(name).filter(|&pid| !alive(pid)) else {
            continue;
        };
        if let Err(e) = ip(&["link", "delete", name]) {
            eprintln!("netns: could not remove link {name}, left by process {pid}: {e:#}");
        }
        removed.insert(pid);
    }
    for pid in removed {
        eprintln!("netns: removed the lab left behind by process {pid}, which is gone");
    }
}

#[cfg(test)]
mod tests {
    use super::{claim, owner};

    #[test]
    fn labs_side_by_side_get_ranges_of_their_own() {
        // Root only, like the labs (the tests run as root: scripts/test.sh).
        let a = claim().expect("a range (needs root for /run/shoal)");
        let b = claim().expect("a second range");
        assert_ne!(a.octet, b.octet);
        drop(a);
        let c = claim().expect("a range again");
        assert_ne!(c.octet, b.octet);
    }

    #[test]
    fn lab_objects_name_their_owner() {
        assert_eq!(owner("shoal123-hub"), Some(123));
        assert_eq!(owner("shoal123-7"), Some(123));
        assert_eq!(owner("shoal123c"), Some(123));
        assert_eq!(owner("shoal-hub"), None);
        assert_eq!(owner("shoal123x"), None);
        assert_eq!(owner("shoal123cc"), None);
        assert_eq!(owner("eth0"), None);
        assert_eq!(owner("shoal99999999999999999999-1"), None);
    }
}

//! Whether this machine has the disk and memory a bench run needs, asked before the run
//! starts: a swarm of N nodes stores the image N times over, and the bench builds the
//! image in memory, so a run too big for the machine would otherwise fill its disk or be
//! killed midway.

use std::path::Path;

use anyhow::Context as _;

/// What a run needs and what the machine has, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Room {
    pub disk_needed: u64,
    pub disk_free: u64,
    pub memory_needed: u64,
    /// `None` where the kernel does not say (no `/proc/meminfo`).
    pub memory_free: Option<u64>,
}

impl Room {
    /// What `dir`'s filesystem and the kernel say is free.
    pub fn measure(dir: &Path, disk_needed: u64, memory_needed: u64) -> anyhow::Result<Self> {
        let fs = rustix::fs::statvfs(dir)
            .with_context(|| format!("reading the free space of {}", dir.display()))?;
        let memory_free = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| mem_available(&m));
        Ok(Self {
            disk_needed,
            disk_free: fs.f_bavail.saturating_mul(fs.f_frsize),
            memory_needed,
            memory_free,
        })
    }

    /// An error naming what is short, by how much, and what to change; `what` names the
    /// run and `dir` where it writes.
    pub fn check(&self, what: &str, dir: &Path) -> anyhow::Result<()> {
        let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
        anyhow::ensure!(
            self.disk_needed <= self.disk_free,
            "{what} stores about {:.1} GiB in {} and its filesystem has {:.1} GiB free: \
             fewer --nodes, a smaller --image-size, or --keep DIR on a larger filesystem",
            gib(self.disk_needed),
            dir.display(),
            gib(self.disk_free)
        );
        if let Some(free) = self.memory_free {
            anyhow::ensure!(
                self.memory_needed <= free,
                "{what} holds about {:.1} GiB in memory and {:.1} GiB is available: a smaller \
                 --image-size",
                gib(self.memory_needed),
                gib(free)
            );
        }
        Ok(())
    }
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_memory_is_read_from_meminfo() {
        let meminfo = "MemTotal:       24570000 kB\nMemFree:         1000 kB\n\
                       MemAvailable:   20000000 kB\nBuffers: 1 kB\n";
        assert_eq!(mem_available(meminfo), Some(20_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: lots kB\n"), None);
    }

    #[test]
    fn a_run_too_big_for_the_disk_or_memory_is_refused_with_what_to_change() {
        let dir = Path::new("/tmp/run");
        let fits = Room {
            disk_needed: 10 << 30,
            disk_free: 20 << 30,
            memory_needed: 1 << 30,
            memory_free: Some(8 << 30),
        };
        fits.check("the run", dir).unwrap();
        let disk = Room {
            disk_free: 5 << 30,
            ..fits
        };
        let error = disk.check("the run", dir).unwrap_err().to_string();
        assert!(error.contains("10.0 GiB in /tmp/run"), "{error}");
        assert!(error.contains("5.0 GiB free"), "{error}");
        assert!(error.contains("--nodes"), "{error}");
        let memory = Room {
            memory_free: Some(1 << 29),
            ..fits
        };
        let error = memory.check("the run", dir).unwrap_err().to_string();
        assert!(error.contains("--image-size"), "{error}");
        // Where the kernel does not say, memory is not held against the run.
        Room {
            memory_free: None,
            ..fits
        }
        .check("the run", dir)
        .unwrap();
    }

    #[test]
    fn this_machine_has_a_disk_and_memory_to_measure() {
        let dir = tempfile::tempdir().unwrap();
        let room = Room::measure(dir.path(), 1, 1).unwrap();
        assert!(room.disk_free > 0);
        assert!(room.memory_free.is_some_and(|m| m > 0));
        room.check("a tiny run", dir.path()).unwrap();
    }
}

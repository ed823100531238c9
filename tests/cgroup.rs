//! Budgets inside a memory cgroup (issue 19, item 5): the real worker runs in a cgroup with a
//! 512 MiB limit; its default `cpu` and `shm` budgets are capped by that limit, an allocate above
//! it is OUT_OF_MEMORY (not an OOM kill), and a budget above it is refused at start.
//!
//! The cgroup is made for the test: cgroup v2 (`memory.max`) where the memory controller is on
//! the v2 hierarchy, else cgroup v1 (`memory.limit_in_bytes`, below this process's own memory
//! cgroup). Where neither can be made (not root, no writable cgroup file system) the test
//! prints `SKIPPED: <reason>` and returns.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{BIN, ListDevices, Requests, Transfer, Worker};
use memcoord::protocol::TransferStatus;
use serde_json::json;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const LIMIT: u64 = 512 << 20;

/// A memory cgroup made for the test, removed when dropped.
struct TestCgroup {
    dir: PathBuf,
    /// The file the limit was written to (memory.max or memory.limit_in_bytes).
    limit_file: &'static str,
}

impl TestCgroup {
    /// Makes a cgroup with a memory limit of `limit` bytes, or says why it cannot.
    fn make(limit: u64) -> Result<TestCgroup, String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let mount_of = |fstype: &str, option: Option<&str>| -> Option<PathBuf> {
            mountinfo.lines().find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let right: Vec<&str> = right.split(' ').collect();
                let ok = right.first() == Some(&fstype)
                    && option
                        .is_none_or(|o| right.get(2).is_some_and(|s| s.split(',').any(|x| x == o)));
                left.split(' ').nth(4).filter(|_| ok).map(PathBuf::from)
            })
        };
        let name = format!("memcoord-test-{}", std::process::id());
        let mut reasons = Vec::new();
        // cgroup v2, with the memory controller given to the top's children.
        if let Some(top) = mount_of("cgroup2", None) {
            let controls =
                std::fs::read_to_string(top.join("cgroup.subtree_control")).unwrap_or_default();
            if controls.split_whitespace().any(|c| c == "memory") {
                match Self::try_make(top.join(&name), "memory.max", limit) {
                    Ok(cg) => return Ok(cg),
                    Err(e) => reasons.push(format!("cgroup v2 at {}: {e}", top.display())),
                }
            } else {
                reasons.push(format!(
                    "cgroup v2 at {} has no memory controller for its children",
                    top.display()
                ));
            }
        }
        // cgroup v1: a child of this process's own memory cgroup.
        if let Some(top) = mount_of("cgroup", Some("memory")) {
            let path = own
                .lines()
                .find_map(|l| {
                    let mut p = l.splitn(3, ':');
                    let (_, c, path) = (p.next()?, p.next()?, p.next()?);
                    c.split(',').any(|c| c == "memory").then_some(path)
                })
                .unwrap_or("/");
            let parent = top.join(path.trim_start_matches('/'));
            let parent = if parent.is_dir() { parent } else { top.clone() };
            match Self::try_make(parent.join(&name), "memory.limit_in_bytes", limit) {
                Ok(cg) => return Ok(cg),
                Err(e) => reasons.push(format!("cgroup v1 at {}: {e}", parent.display())),
            }
        }
        if reasons.is_empty() {
            reasons.push("no cgroup file system with a memory controller is mounted".into());
        }
        Err(reasons.join("; "))
    }

    fn try_make(dir: PathBuf, limit_file: &'static str, limit: u64) -> Result<TestCgroup, String> {
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let cg = TestCgroup { dir, limit_file };
        std::fs::write(cg.dir.join(limit_file), limit.to_string())
            .map_err(|e| format!("writing {limit_file}: {e}"))?;
        Ok(cg)
    }

    /// `memcoord ARGS` run by a shell that first moves itself into the cgroup.
    fn command(&self, args: &[&str]) -> Command {
        let mut script = format!(
            "echo $$ > '{}' || exit 99; exec '{BIN}'",
            self.dir.join("cgroup.procs").display()
        );
        for a in args {
            script.push_str(&format!(" '{a}'"));
        }
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        cmd
    }

    fn limit_path(&self) -> PathBuf {
        self.dir.join(self.limit_file)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The worker has exited by now; its cgroup empties a moment later.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[test]
fn budgets_are_capped_by_the_cgroup_memory_limit() {
    let cg = match TestCgroup::make(LIMIT) {
        Ok(cg) => cg,
        Err(reason) => {
            println!("SKIPPED: cannot make a memory cgroup: {reason}");
            return;
        }
    };
    let limit_path = cg.limit_path();
    println!("cgroup: {}", limit_path.display());

    // Default budgets: half of the capacity, the capacity being at most the limit.
    let mut w = Worker::spawn_command(cg.command(&["worker", "--no-gpu"]));
    let cpu = w.stats("cpu");
    let expected_cpu = mem_total().min(LIMIT) / 2;
    assert_eq!(cpu.budget_bytes, expected_cpu, "{cpu:?}");
    let shm = w.stats("shm");
    assert!(shm.budget_bytes <= LIMIT / 2, "{shm:?}");
    let devices = w.send::<ListDevices>(json!({})).unwrap();
    for d in &devices.devices {
        assert!(
            d.available_memory <= LIMIT / 2,
            "a host device offers more than its capped budget: {d:?}"
        );
    }

    // An allocate above the limit is refused; the worker lives on.
    let v = w.request(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 800u64 << 20, "timeout_seconds": 0}),
    );
    assert_eq!(v["error_code"], json!("OUT_OF_MEMORY"), "{v}");
    assert_eq!(v["status_code"], json!(503), "{v}");
    // Memory within the budget is handed out and really backed (a copy writes every byte).
    let id = w.allocate("cpu", 128 << 20);
    let shm_id = w.allocate("shm", 128 << 20);
    let t = w
        .send::<Transfer>(json!({"allocation_id": shm_id, "source_device_id": "shm",
               "destination_device_id": "cpu", "mode": "copy", "wait_for_completion": true}))
        .unwrap();
    assert_eq!(t.status, TransferStatus::Completed, "{t:?}");
    w.ok("memory.deallocate", json!({"allocation_id": id}));
    assert_eq!(w.stats("cpu").failed_allocations, 1);
    let status = w.close(Duration::from_secs(20));
    assert!(
        status.success(),
        "the worker did not exit cleanly: {status:?}"
    );

    // A budget above the limit is a usage error naming the limit and its file, from a flag...
    let out = cg
        .command(&["worker", "--no-gpu", "--budget", "cpu=800MiB"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("512.00 MiB"), "{err}");
    assert!(err.contains(&limit_path.display().to_string()), "{err}");
    assert!(out.stdout.is_empty());
    // ... or from a config file.
    let dir = std::env::temp_dir().join(format!("memcoord-cgroup-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("c.toml");
    std::fs::write(&config, "[budgets]\nshm = \"1GiB\"\n").unwrap();
    let out = cg
        .command(&["worker", "--no-gpu", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("budget of shm") && err.contains("512.00 MiB"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);

    // A budget at the limit is taken.
    let mut w =
        Worker::spawn_command(cg.command(&["worker", "--no-gpu", "--budget", "cpu=512MiB"]));
    assert_eq!(w.stats("cpu").budget_bytes, LIMIT);
    assert!(w.close(Duration::from_secs(20)).success());

    // `memcoord devices` says which limit capped the defaults.
    if mem_total() > LIMIT {
        let out = cg.command(&["devices", "--no-gpu"]).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("capped by this process's memory limit of 512.00 MiB")
                && text.contains(&limit_path.display().to_string()),
            "{text}"
        );
    }
}

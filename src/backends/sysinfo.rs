//! Host memory figures: /proc/meminfo, the tmpfs behind /dev/shm, and the memory limit of the
//! process's cgroup.

use super::Capacity;
use std::path::{Path, PathBuf};

/// MemTotal and MemAvailable from /proc/meminfo, in bytes.
pub fn meminfo() -> Capacity {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    parse_meminfo(&text)
}

fn parse_meminfo(text: &str) -> Capacity {
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    Capacity {
        total: field("MemTotal:"),
        free: field("MemAvailable:"),
        used: None,
    }
}

/// The size and free space of the file system holding `dir` (statvfs).
pub fn tmpfs_capacity(dir: &Path) -> Capacity {
    use std::os::unix::ffi::OsStrExt;
    let Ok(cpath) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return Capacity {
            total: 0,
            free: 0,
            used: None,
        };
    };
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(cpath.as_ptr(), &raw mut st) };
    if rc != 0 {
        return Capacity {
            total: 0,
            free: 0,
            used: None,
        };
    }
    let frsize = st.f_frsize as u64;
    Capacity {
        total: st.f_blocks as u64 * frsize,
        free: st.f_bavail as u64 * frsize,
        used: None,
    }
}

/// A memory limit the kernel enforces on this process: a cgroup's, past which the OOM killer
/// ends the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLimit {
    /// The limit, in bytes.
    pub bytes: u64,
    /// The file it was read from (`…/memory.max` for cgroup v2, `…/memory.limit_in_bytes` for v1):
    /// the process's own cgroup or the ancestor with the smallest limit.
    pub source: PathBuf,
}

impl std::fmt::Display for MemoryLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let version = if self.source.ends_with("memory.max") {
            "cgroup v2"
        } else {
            "cgroup v1"
        };
        write!(
            f,
            "{} ({version} limit in {})",
            crate::units::format_bytes(self.bytes),
            self.source.display()
        )
    }
}

/// The memory limit of this process's cgroup (the smallest of its own and its ancestors'), or
/// `None` when there is none (or no cgroup file system to read it from).
pub fn cgroup_memory_limit() -> Option<MemoryLimit> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    cgroup_memory_limit_in(&cgroup, &mountinfo, Path::new("/"))
}

/// v1 writes "no limit" as the largest page-aligned counter (9223372036854771712); anything
/// from 2^62 bytes up is no limit.
const V1_UNLIMITED: u64 = 1 << 62;

/// A cgroup hierarchy that can hold a memory limit: where it is mounted, the cgroup the mount
/// shows at its top, and the file holding the limit.
struct Hierarchy<'a> {
    mount_point: String,
    mount_root: String,
    file: &'static str,
    /// This process's cgroup in the hierarchy (from /proc/self/cgroup).
    cgroup: &'a str,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mount_path(raw: &str) -> String {
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') << 6 | (d[1] - b'0') << 3 | (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// [`cgroup_memory_limit`] over given texts of /proc/self/cgroup and /proc/self/mountinfo, with
/// every mount point read under `root` (`/` for this machine; a test directory in tests).
///
/// cgroup v2: the `0::PATH` line and the `cgroup2` mount, file `memory.max` (`max`: none).
/// cgroup v1: the line whose controllers include `memory` and the `cgroup` mount with the
/// `memory` option, file `memory.limit_in_bytes`. The process's cgroup and every ancestor up to
/// the mount's top are read and the smallest limit applies, as the kernel applies it. Where
/// both versions are mounted (a hybrid host), the smaller limit found applies.
pub fn cgroup_memory_limit_in(cgroup: &str, mountinfo: &str, root: &Path) -> Option<MemoryLimit> {
    let mut v2_cgroup = None;
    let mut v1_cgroup = None;
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2_cgroup = Some(path);
        } else if controllers.split(',').any(|c| c == "memory") {
            v1_cgroup = Some(path);
        }
    }
    let mut hierarchies = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(mount_root), Some(mount_point), Some(fstype)) =
            (left.get(3), left.get(4), right.first())
        else {
            continue;
        };
        let (file, cgroup) = match *fstype {
            "cgroup2" => ("memory.max", v2_cgroup),
            "cgroup"
                if right
                    .get(2)
                    .is_some_and(|o| o.split(',').any(|o| o == "memory")) =>
            {
                ("memory.limit_in_bytes", v1_cgroup)
            }
            _ => continue,
        };
        let Some(cgroup) = cgroup else { continue };
        hierarchies.push(Hierarchy {
            mount_point: unescape_mount_path(mount_point),
            mount_root: unescape_mount_path(mount_root),
            file,
            cgroup,
        });
    }
    hierarchies
        .iter()
        .filter_map(|h| hierarchy_limit(h, root))
        .min_by_key(|l| l.bytes)
}

/// The smallest limit of the process's cgroup and its ancestors in one hierarchy.
fn hierarchy_limit(h: &Hierarchy<'_>, root: &Path) -> Option<MemoryLimit> {
    let top = root.join(h.mount_point.trim_start_matches('/'));
    // The cgroup's path below the mount's top. A path outside it (another cgroup namespace) or
    // one that climbs (`..`) leaves only the top to read.
    let below = Path::new(h.cgroup)
        .strip_prefix(&h.mount_root)
        .ok()
        .filter(|p| {
            p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        })
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut dir = top.join(below);
    let mut best: Option<MemoryLimit> = None;
    loop {
        let file = dir.join(h.file);
        if let Some(bytes) = std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| parse_limit(&t))
            && best.as_ref().is_none_or(|b| bytes < b.bytes)
        {
            best = Some(MemoryLimit {
                bytes,
                source: file,
            });
        }
        if dir == top || !dir.pop() || !dir.starts_with(&top) {
            return best;
        }
    }
}

/// A limit file's value: bytes, or `None` for no limit (`max`, v1's huge value) or garbage.
fn parse_limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    t.parse::<u64>().ok().filter(|&b| b < V1_UNLIMITED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_meminfo() {
        let c = parse_meminfo(
            "MemTotal:       24576000 kB\nMemFree: 1 kB\nMemAvailable:   20000000 kB\n",
        );
        assert_eq!(c.total, 24_576_000 * 1024);
        assert_eq!(c.free, 20_000_000 * 1024);
    }

    #[test]
    fn reads_this_machine() {
        assert!(meminfo().total > 0);
        assert!(tmpfs_capacity(Path::new("/dev/shm")).total > 0);
    }

    fn fake_root(name: &str) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("memcoord-cgroup-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        root
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    const V2_MOUNTINFO: &str = "25 30 0:23 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n\
                                 26 30 0:24 / /dev/shm rw - tmpfs tmpfs rw\n";

    #[test]
    fn cgroup_v2_takes_the_smallest_limit_of_the_cgroup_and_its_ancestors() {
        let root = fake_root("v2");
        let cg = root.join("sys/fs/cgroup");
        write(&cg.join("app.slice/memory.max"), "1073741824\n");
        write(&cg.join("app.slice/worker/memory.max"), "max\n");
        let l = cgroup_memory_limit_in("0::/app.slice/worker\n", V2_MOUNTINFO, &root).unwrap();
        assert_eq!(l.bytes, 1 << 30);
        assert_eq!(l.source, cg.join("app.slice/memory.max"));
        assert!(l.to_string().contains("cgroup v2"), "{l}");

        // A smaller limit deeper down wins.
        write(&cg.join("app.slice/worker/memory.max"), "536870912\n");
        let l = cgroup_memory_limit_in("0::/app.slice/worker\n", V2_MOUNTINFO, &root).unwrap();
        assert_eq!(l.bytes, 512 << 20);
        assert_eq!(l.source, cg.join("app.slice/worker/memory.max"));

        // Unlimited everywhere, or no cgroup2 line: no limit.
        write(&cg.join("app.slice/worker/memory.max"), "max\n");
        write(&cg.join("app.slice/memory.max"), "max\n");
        assert_eq!(
            cgroup_memory_limit_in("0::/app.slice/worker\n", V2_MOUNTINFO, &root),
            None
        );
        assert_eq!(
            cgroup_memory_limit_in("4:memory:/x\n", V2_MOUNTINFO, &root),
            None
        );
        // Garbage and a cgroup path that climbs out are harmless.
        write(&cg.join("app.slice/memory.max"), "lots\n");
        assert_eq!(
            cgroup_memory_limit_in("0::/../../etc\n", V2_MOUNTINFO, &root),
            None
        );
        assert_eq!(cgroup_memory_limit_in("", "", &root), None);
        assert_eq!(
            cgroup_memory_limit_in("garbage", "garbage - x", &root),
            None
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_namespaced_v2_cgroup_reads_the_mount_top() {
        // Inside a container with a cgroup namespace the process is at `/` and its own limit
        // is in the file at the mount's top.
        let root = fake_root("ns");
        write(&root.join("sys/fs/cgroup/memory.max"), "268435456\n");
        let l = cgroup_memory_limit_in("0::/\n", V2_MOUNTINFO, &root).unwrap();
        assert_eq!(l.bytes, 256 << 20);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn cgroup_v1_reads_memory_limit_in_bytes_below_the_mount_root() {
        let root = fake_root("v1");
        // A hybrid host: v1 memory controller, and a cgroup2 mount without it.
        let mountinfo = "35 31 0:32 /docker /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                         32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                         41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        let cgroup = "9:name=systemd:/\n4:memory:/docker/abc\n1:cpu:/\n0::/\n";
        let mem = root.join("sys/fs/cgroup/memory");
        write(&mem.join("memory.limit_in_bytes"), "9223372036854771712\n");
        write(&mem.join("abc/memory.limit_in_bytes"), "805306368\n");
        write(&root.join("sys/fs/cgroup/cpu/memory.limit_in_bytes"), "1\n");
        let l = cgroup_memory_limit_in(cgroup, mountinfo, &root).unwrap();
        assert_eq!(l.bytes, 768 << 20);
        assert_eq!(l.source, mem.join("abc/memory.limit_in_bytes"));
        assert!(l.to_string().contains("cgroup v1"), "{l}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_path("/a\\9"), "/a\\9");
    }

    #[test]
    fn this_machine_s_limit_if_any_is_positive() {
        if let Some(l) = cgroup_memory_limit() {
            assert!(l.bytes > 0);
        }
    }
}

//! Host memory figures: /proc/meminfo and the tmpfs behind /dev/shm.

use super::Capacity;
use std::path::Path;

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
    let rc = unsafe { libc::statvfs(cpath.as_ptr(), &mut st) };
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
}

//! Opening files beneath a directory without following links out of it: `openat2` with
//! `RESOLVE_BENEATH`, or a component-wise `O_NOFOLLOW` walk on kernels without it. The model
//! loader (`service::model_files`) opens model files through these; the system calls `std`
//! lacks live here, with the crate's other `unsafe` code.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};
use std::sync::atomic::{AtomicBool, Ordering};

/// Why a file could not be opened beneath the root.
pub(crate) enum Refused {
    /// The path leaves the root (`..`, an absolute symlink, a symlink out of it).
    Outside,
    /// Without openat2: a component is a symlink (or not a folder).
    Symlink(String),
    /// Anything else (no such file, permissions).
    Io(io::Error),
}

/// Set once openat2 answered ENOSYS: the walk is used from then on.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// `open_how` of linux/openat2.h (libc's is non-exhaustive, so it cannot be built safely).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Flags of every model file open: read-only, and a FIFO or a device must not block the open.
const OPEN_FLAGS: libc::c_int =
    libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK;

pub(crate) fn open_beneath(root: &File, rel: &CString) -> Result<File, Refused> {
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        // RESOLVE_BENEATH: the kernel refuses (EXDEV) any resolution that leaves the root, by
        // `..`, by an absolute path or through a symlink, checked on each step of the walk,
        // so no swap of a folder for a link between steps can take it outside.
        // RESOLVE_NO_MAGICLINKS: no /proc/self/fd-style links. Symlinks that stay inside the
        // root are followed (no RESOLVE_NO_SYMLINKS): a Hugging Face cache links
        // snapshots/<rev>/model.safetensors to ../../blobs/<hash>, and that is worth loading.
        let how = OpenHow {
            flags: OPEN_FLAGS as u64,
            mode: 0,
            resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
        };
        // The kernel may answer EAGAIN when a rename raced a `..` step; it asks for a retry.
        for _ in 0..64 {
            // SAFETY: openat2 reads `rel` (NUL-terminated, alive for the call) and `how`
            // (a repr(C) open_how of the size passed); it returns a new descriptor or -1.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    root.as_raw_fd(),
                    rel.as_ptr(),
                    &raw const how,
                    std::mem::size_of::<OpenHow>(),
                )
            };
            if fd >= 0 {
                return Ok(owned(fd as RawFd));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => continue,
                Some(libc::EXDEV) => return Err(Refused::Outside),
                Some(libc::ENOSYS) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                    break;
                }
                _ => return Err(Refused::Io(e)),
            }
        }
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            return Err(Refused::Io(io::Error::other(
                "the folders on the way kept changing while it was opened",
            )));
        }
    }
    open_walk(root, Path::new(std::ffi::OsStr::from_bytes(rel.as_bytes())))
}

/// The fallback for kernels without openat2 (before 5.6): one component at a time from the
/// root's descriptor, each with O_NOFOLLOW, so a symlink is refused wherever it is (inside the
/// root or not: without the kernel's check, telling the two apart by name would be raceable).
/// `..` goes back to the folder this walk came from, and never above the root.
fn open_walk(root: &File, rel: &Path) -> Result<File, Refused> {
    let parts: Vec<Component<'_>> = rel.components().collect();
    // Folders this walk opened, below the root (the root itself stays borrowed).
    let mut dirs: Vec<File> = Vec::new();
    // The file's own name: the last component, when it is a name (after a trailing `..` the
    // path names a folder, opened below as ".").
    let last = match parts.last() {
        Some(Component::Normal(_)) => parts.len() - 1,
        _ => usize::MAX,
    };
    for (i, part) in parts.iter().enumerate() {
        let name = match part {
            Component::CurDir => continue,
            Component::ParentDir => {
                if dirs.pop().is_none() {
                    return Err(Refused::Outside);
                }
                continue;
            }
            Component::RootDir | Component::Prefix(_) => return Err(Refused::Outside),
            Component::Normal(n) => *n,
        };
        let c = CString::new(name.as_bytes())
            .map_err(|_| Refused::Io(io::Error::other("the path contains a NUL byte")))?;
        let at = dirs.last().unwrap_or(root).as_raw_fd();
        let flags = if i == last {
            OPEN_FLAGS | libc::O_NOFOLLOW
        } else {
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC
        };
        // SAFETY: openat reads the NUL-terminated `c`, alive for the call, relative to a
        // descriptor this function holds; it returns a new descriptor or -1.
        let fd = unsafe { libc::openat(at, c.as_ptr(), flags) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ELOOP | libc::ENOTDIR) => {
                    Refused::Symlink(name.to_string_lossy().into_owned())
                }
                _ => Refused::Io(e),
            });
        }
        let f = owned(fd);
        if i == last {
            return Ok(f);
        }
        dirs.push(f);
    }
    // No file name at all (".", "a/.."): the folder itself, which the caller refuses as not a
    // regular file.
    let at = dirs.last().unwrap_or(root).as_raw_fd();
    // SAFETY: as above, with a static NUL-terminated ".".
    let fd = unsafe { libc::openat(at, c".".as_ptr(), OPEN_FLAGS) };
    if fd < 0 {
        return Err(Refused::Io(io::Error::last_os_error()));
    }
    Ok(owned(fd))
}

fn owned(fd: RawFd) -> File {
    // SAFETY: `fd` was just returned by a successful open call and is owned by no one else.
    unsafe { File::from_raw_fd(fd) }
}

pub(crate) fn clear_nonblock(file: &File) {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor `file` owns; F_GETFL/F_SETFL touch only its flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Dir {
            let d =
                std::env::temp_dir().join(format!("memcoord-files-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn walk(root: &Path, rel: &str) -> Result<File, Refused> {
        open_walk(&File::open(root).unwrap(), Path::new(rel))
    }

    /// The fallback walk (kernels without openat2): plain names and `..` inside the root open;
    /// `..` above the root, absolute paths and every symlink (in or out) are refused.
    #[test]
    fn the_walk_without_openat2_refuses_links_and_leaving_the_root() {
        let root = Dir::new("walk");
        let outside = Dir::new("walk-outside");
        std::fs::create_dir_all(root.0.join("a/b")).unwrap();
        std::fs::write(root.0.join("a/b/m.safetensors"), b"inside").unwrap();
        std::fs::write(outside.0.join("m.safetensors"), b"outside").unwrap();
        std::os::unix::fs::symlink(&outside.0, root.0.join("out")).unwrap();
        std::os::unix::fs::symlink("a/b", root.0.join("in")).unwrap();
        std::os::unix::fs::symlink("a/b/m.safetensors", root.0.join("file-link")).unwrap();

        let read = |f: File| std::io::read_to_string(f).unwrap();
        assert_eq!(
            read(walk(&root.0, "a/b/m.safetensors").ok().unwrap()),
            "inside"
        );
        assert_eq!(
            read(walk(&root.0, "./a/../a/b/./m.safetensors").ok().unwrap()),
            "inside"
        );
        let name = outside.0.file_name().unwrap().to_str().unwrap();
        for rel in [
            "../x".to_string(),
            format!("../{name}/m.safetensors"),
            "a/../../x".to_string(),
            "/etc/passwd".to_string(),
        ] {
            assert!(
                matches!(walk(&root.0, &rel), Err(Refused::Outside)),
                "{rel} is outside"
            );
        }
        for rel in ["out/m.safetensors", "in/m.safetensors", "file-link"] {
            assert!(
                matches!(walk(&root.0, rel), Err(Refused::Symlink(_))),
                "{rel} goes through a symlink"
            );
        }
        assert!(matches!(
            walk(&root.0, "a/missing"),
            Err(Refused::Io(e)) if e.kind() == io::ErrorKind::NotFound
        ));
    }
}

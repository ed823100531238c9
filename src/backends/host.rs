//! Host backends: `cpu` (private anonymous memory) and `shm` (a file under /dev/shm that other
//! processes can map). Both reserve their whole range up front without backing it; pages are
//! backed by `commit` (MADV_POPULATE_WRITE) and given back by `release` (MADV_DONTNEED for
//! anonymous memory, hole punching for the file).

use super::{
    Backend, BackendError, CachedCapacity, Capacity, SharedPiece, meminfo, tmpfs_capacity,
};
use crate::domain::{Handle, MemoryType};
use memmap2::{Advice, MmapMut, MmapOptions, UncheckedAdvice};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

fn host_page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

/// Backs pages by prefaulting them writable. Falls back to touching one byte per page on
/// kernels without MADV_POPULATE_WRITE (before 5.14); only pages that hold no live data are
/// ever committed, so writing a zero there is harmless.
fn populate(
    map: &mut MmapMut,
    device: &str,
    offset: u64,
    len: u64,
    page: u64,
) -> Result<(), BackendError> {
    match map.advise_range(Advice::PopulateWrite, offset as usize, len as usize) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let mut at = offset;
            while at < offset + len {
                map[at as usize] = 0;
                at += page;
            }
            Ok(())
        }
        Err(source) => Err(BackendError::Os {
            device: device.to_string(),
            what: "backing pages",
            source,
        }),
    }
}

/// Gives pages of a shared-memory file their tmpfs pages now (fallocate), so that a full
/// tmpfs is an error here (ENOSPC) instead of a SIGBUS at the first write.
fn allocate_file_pages(fd: i32, offset: u64, len: u64) -> Result<(), BackendError> {
    // SAFETY: fallocate on a descriptor the caller owns; mode 0 within the file's length only
    // allocates pages (holes become zero pages), it never changes bytes already there.
    let rc = unsafe { libc::fallocate(fd, 0, offset as libc::off_t, len as libc::off_t) };
    if rc == 0 {
        return Ok(());
    }
    Err(BackendError::Os {
        device: "shm".into(),
        what: "backing pages (the tmpfs may be full)",
        source: std::io::Error::last_os_error(),
    })
}

/// Faults in pages of a host mapping from any thread (MADV_POPULATE_WRITE); for a shared
/// file, allocates the file's pages first.
struct MappingCommitter {
    base: usize,
    len: u64,
    page: u64,
    device: &'static str,
    /// The shared-memory file behind the mapping (`shm`).
    file: Option<std::sync::Arc<File>>,
}

impl MappingCommitter {
    fn of(
        map: &MmapMut,
        page: u64,
        device: &'static str,
        file: Option<std::sync::Arc<File>>,
    ) -> std::sync::Arc<dyn super::Committer> {
        std::sync::Arc::new(MappingCommitter {
            base: map.as_ptr() as usize,
            len: map.len() as u64,
            page,
            device,
            file,
        })
    }
}

impl super::Committer for MappingCommitter {
    fn commit(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(BackendError::Device {
                device: self.device.into(),
                what: "backing pages",
                message: "range outside the mapping".into(),
            });
        }
        if let Some(file) = &self.file {
            allocate_file_pages(file.as_raw_fd(), offset, len)?;
        }
        let ptr = (self.base + offset as usize) as *mut libc::c_void;
        // SAFETY: the range lies inside the mapping (checked above), which outlives every
        // commit: the service commits only while the allocation's request is in flight, and
        // closing waits for those. MADV_POPULATE_WRITE faults pages in without changing bytes.
        let rc = unsafe { libc::madvise(ptr, len as usize, libc::MADV_POPULATE_WRITE) };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) {
            if self.file.is_some() {
                // Kernels before 5.14: the file's pages are allocated; the first touch maps them.
                return Ok(());
            }
            // Kernels before 5.14: touch each page. Only pages that hold no live data are
            // committed, so writing a zero there is harmless.
            let mut at = 0;
            while at < len {
                // SAFETY: inside the checked range.
                unsafe { std::ptr::write_volatile(ptr.cast::<u8>().add(at as usize), 0) };
                at += self.page;
            }
            return Ok(());
        }
        Err(BackendError::Os {
            device: self.device.into(),
            what: "backing pages",
            source: e,
        })
    }
}

/// `cpu`: private host RAM.
pub struct CpuBackend {
    map: MmapMut,
    page: u64,
    capacity: CachedCapacity,
}

impl CpuBackend {
    /// Reserves `len` bytes of address space (rounded up to whole pages), backed by nothing yet.
    pub fn new(len: u64) -> Result<Self, BackendError> {
        let page = host_page_size();
        let len = len.div_ceil(page).max(1) * page;
        let map = MmapOptions::new()
            .len(len as usize)
            .no_reserve_swap()
            .map_anon()
            .map_err(|source| BackendError::Os {
                device: "cpu".into(),
                what: "reserving address space",
                source,
            })?;
        Ok(CpuBackend {
            map,
            page,
            capacity: CachedCapacity::new(),
        })
    }
}

impl Backend for CpuBackend {
    fn device_id(&self) -> &str {
        "cpu"
    }
    fn name(&self) -> &str {
        "Host RAM"
    }
    fn memory_type(&self) -> MemoryType {
        MemoryType::RAM
    }
    fn capacity(&mut self) -> Capacity {
        self.capacity.get(meminfo)
    }
    fn len(&self) -> u64 {
        self.map.len() as u64
    }
    fn page_size(&self) -> u64 {
        self.page
    }
    fn commit(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        populate(&mut self.map, "cpu", offset, len, self.page)
    }
    fn release(&mut self, offset: u64, len: u64) {
        // MADV_FREE rather than MADV_DONTNEED: the kernel takes the pages when it needs them
        // instead of unmapping them now, which made giving back pages a third of the cost of a
        // defragment; a page written again before the kernel took it is simply kept.
        // SAFETY: the pages' contents may be dropped; the arena only releases pages that no
        // live allocation touches, and nothing holds references into the mapping.
        let r = unsafe {
            self.map
                .unchecked_advise_range(UncheckedAdvice::Free, offset as usize, len as usize)
        };
        if let Err(e) = r {
            tracing::warn!("cpu: releasing pages failed: {e}");
        }
    }
    fn host_slice(&self, offset: u64, len: u64) -> Option<&[u8]> {
        self.map.get(offset as usize..(offset + len) as usize)
    }
    fn host_slice_mut(&mut self, offset: u64, len: u64) -> Option<&mut [u8]> {
        self.map.get_mut(offset as usize..(offset + len) as usize)
    }
    fn committer(&self) -> Option<std::sync::Arc<dyn super::Committer>> {
        Some(MappingCommitter::of(&self.map, self.page, "cpu", None))
    }
    fn handle(&self, _offset: u64) -> Option<Handle> {
        None
    }
}

static SHM_FILES: AtomicU64 = AtomicU64::new(0);

/// Permissions of `shm` files by default: the owner's only. Another user's process that maps
/// allocations needs them widened (`--shm-mode`).
pub const DEFAULT_SHM_MODE: u32 = 0o600;

/// Removes `memcoord-<pid>-<n>-shm` files in `dir` left by workers that no longer run (killed
/// before they could clean up). Returns how many were removed.
pub fn remove_stale_shm_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("memcoord-state-") && name.ends_with("-shm") {
            // A state directory's file: it outlives workers, but not its directory.
            let note = owner_note(&entry.path());
            if let Ok(owner) = std::fs::read(&note)
                && !owner.is_empty()
            {
                let owner = PathBuf::from(std::ffi::OsString::from(
                    String::from_utf8_lossy(&owner).into_owned(),
                ));
                if !owner.is_dir() && std::fs::remove_file(entry.path()).is_ok() {
                    let _ = std::fs::remove_file(&note);
                    tracing::warn!(
                        "removed {}: its state directory {} is gone, and with it the record \
                         of what the file held",
                        entry.path().display(),
                        owner.display()
                    );
                    removed += 1;
                }
            }
            continue;
        }
        let Some(pid) = name
            .strip_prefix("memcoord-")
            .and_then(|rest| rest.strip_suffix("-shm"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::remove_file(entry.path()).is_ok()
        {
            tracing::info!(
                "removed {} left by worker {pid}, which is gone",
                entry.path().display()
            );
            removed += 1;
        }
    }
    removed
}

/// `shm`: a sparse file under a tmpfs (normally /dev/shm), mapped shared, so another process can
/// map an allocation by its handle's path and offset. The file is removed when the backend is
/// dropped.
pub struct ShmBackend {
    /// Declared first, so dropped first: unregistered before the mapping goes.
    guard: super::sigbus::Guard,
    map: MmapMut,
    file: std::sync::Arc<File>,
    path: PathBuf,
    dir: PathBuf,
    page: u64,
    capacity: CachedCapacity,
    /// The file outlives the backend (`--state-dir`: persistent allocations survive).
    keep: bool,
}

impl ShmBackend {
    /// Creates `memcoord-<pid>-<n>-shm` in `dir`, `len` bytes long (rounded up to whole pages)
    /// and sparse, with permissions `mode` (see [`DEFAULT_SHM_MODE`]), and maps it.
    pub fn new(dir: &Path, len: u64, mode: u32) -> Result<Self, BackendError> {
        let os = |what: &'static str| {
            move |source| BackendError::Os {
                device: "shm".into(),
                what,
                source,
            }
        };
        let page = host_page_size();
        let len = len.div_ceil(page).max(1) * page;
        let n = SHM_FILES.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("memcoord-{}-{n}-shm", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(os("creating the shared-memory file"))?;
        let made = file
            .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(os("setting the shared-memory file's permissions"))
            .and_then(|()| {
                file.set_len(len)
                    .map_err(os("sizing the shared-memory file"))
            })
            .and_then(|()| {
                // SAFETY: the file is ours, freshly created; other processes may map it too,
                // which is the point of `shm`: they follow the handle protocol (the contract's section 6, docs/protocol.md).
                unsafe { MmapOptions::new().len(len as usize).map_mut(&file) }
                    .map_err(os("mapping the shared-memory file"))
            });
        match made {
            Ok(map) => Ok(ShmBackend {
                guard: super::sigbus::Guard::register(
                    map.as_ptr() as usize,
                    map.len(),
                    file.as_raw_fd(),
                ),
                map,
                file: std::sync::Arc::new(file),
                path,
                dir: dir.to_path_buf(),
                page,
                capacity: CachedCapacity::new(),
                keep: false,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Opens (or creates, with permissions `mode`) the file at `path` for a worker whose
    /// persistent allocations survive it: the file is kept when the backend goes, and an existing one keeps its bytes
    /// (it grows to `len` if shorter, never shrinks).
    ///
    /// `owner` is the state directory the file belongs to; it is written beside the file
    /// (`<file>.dir`), so that a later worker can remove the file once that directory is gone
    /// ([`remove_stale_shm_files`]).
    pub fn open_persistent(
        path: &Path,
        len: u64,
        mode: u32,
        owner: &Path,
    ) -> Result<Self, BackendError> {
        let os = |what: &'static str| {
            move |source| BackendError::Os {
                device: "shm".into(),
                what,
                source,
            }
        };
        let page = host_page_size();
        // The note first, and whole (written aside, then renamed): a worker starting meanwhile
        // that finds the file always reads a complete note, never an empty one it would take
        // for a directory that is gone.
        let owner = std::fs::canonicalize(owner).unwrap_or_else(|_| owner.to_path_buf());
        write_owner_note(path, &owner).map_err(os(
            "noting the state directory beside the shared-memory file",
        ))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(mode)
            .open(path)
            .map_err(os("opening the shared-memory file"))?;
        // Exactly `mode`, whatever the umask, and for a file an earlier worker made too.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(os("setting the shared-memory file's permissions"))?;
        let existing = file
            .metadata()
            .map_err(os("reading the shared-memory file's size"))?
            .len();
        let len = (len.div_ceil(page).max(1) * page).max(existing.div_ceil(page) * page);
        if len > existing {
            file.set_len(len)
                .map_err(os("sizing the shared-memory file"))?;
        }
        // SAFETY: as in `new`; the file is this state directory's, other processes map it by
        // the handle protocol.
        let map = unsafe { MmapOptions::new().len(len as usize).map_mut(&file) }
            .map_err(os("mapping the shared-memory file"))?;
        Ok(ShmBackend {
            guard: super::sigbus::Guard::register(
                map.as_ptr() as usize,
                map.len(),
                file.as_raw_fd(),
            ),
            map,
            file: std::sync::Arc::new(file),
            path: path.to_path_buf(),
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            page,
            capacity: CachedCapacity::new(),
            keep: true,
        })
    }

    /// The file another process maps.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ShmBackend {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
            let _ = std::fs::remove_file(owner_note(&self.path));
        }
    }
}

/// The file beside a state directory's `shm` file that names the directory.
fn owner_note(shm_file: &Path) -> PathBuf {
    let mut name = shm_file.as_os_str().to_owned();
    name.push(".dir");
    PathBuf::from(name)
}

/// Writes the note naming `owner` atomically: a temporary file of this process, renamed over.
fn write_owner_note(shm_file: &Path, owner: &Path) -> std::io::Result<()> {
    let note = owner_note(shm_file);
    let mut tmp = note.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    // 0600 like the file it describes: where a state directory lies is this user's business.
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            f.write_all(owner.as_os_str().as_encoded_bytes())
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &note).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Whether `[offset, offset + len)` of `file` (of `file_len` bytes) has a hole: pages the
/// file no longer holds (removed and made again, or given back), which read as zeros. tmpfs
/// reports pages that were written (or faulted in writable) as data.
pub fn has_hole(file: &File, file_len: u64, offset: u64, len: u64) -> std::io::Result<bool> {
    if offset.saturating_add(len) > file_len {
        return Ok(true);
    }
    // SAFETY: lseek on a descriptor the caller owns.
    let hole = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, libc::SEEK_HOLE) };
    if hole < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((hole as u64) < offset + len)
}

impl Backend for ShmBackend {
    fn device_id(&self) -> &str {
        "shm"
    }
    fn name(&self) -> &str {
        "Host shared memory (/dev/shm)"
    }
    fn memory_type(&self) -> MemoryType {
        MemoryType::SharedMemory
    }
    fn capacity(&mut self) -> Capacity {
        let dir = &self.dir;
        self.capacity.get(|| tmpfs_capacity(dir))
    }
    fn len(&self) -> u64 {
        self.map.len() as u64
    }
    fn page_size(&self) -> u64 {
        self.page
    }
    fn commit(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        allocate_file_pages(self.file.as_raw_fd(), offset, len)?;
        populate(&mut self.map, "shm", offset, len, self.page)
    }
    fn release(&mut self, offset: u64, len: u64) {
        // SAFETY: fallocate on our own descriptor; punching a hole frees the tmpfs pages and
        // zaps them from every mapping; the arena only releases pages no live allocation touches.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc != 0 {
            tracing::warn!(
                "shm: releasing pages failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    fn host_slice(&self, offset: u64, len: u64) -> Option<&[u8]> {
        self.map.get(offset as usize..(offset + len) as usize)
    }
    fn host_slice_mut(&mut self, offset: u64, len: u64) -> Option<&mut [u8]> {
        self.map.get_mut(offset as usize..(offset + len) as usize)
    }
    fn committer(&self) -> Option<std::sync::Arc<dyn super::Committer>> {
        Some(MappingCommitter::of(
            &self.map,
            self.page,
            "shm",
            Some(self.file.clone()),
        ))
    }
    fn begin_access(&self) -> u64 {
        self.guard.begin()
    }
    fn end_access(&self, token: u64) -> Result<(), BackendError> {
        self.guard.end(token).map_err(|faults| BackendError::Device {
            device: "shm".into(),
            what: "accessing shared memory",
            message: format!(
                "another process truncated {} or took pages of it away while memcoord used them \
                 ({faults} pages faulted); the bytes there are lost. Clients must never truncate \
                 or punch the shared-memory file",
                self.path.display()
            ),
        })
    }
    fn keep_file(&mut self, keep: bool) {
        self.keep = keep;
    }
    fn share(&self, offset: u64, len: u64) -> Result<Option<Vec<SharedPiece>>, BackendError> {
        // The whole range is one file: one piece, at the same offset in it.
        Ok(Some(vec![SharedPiece {
            offset,
            len,
            file: std::sync::Arc::clone(&self.file),
            file_offset: offset,
        }]))
    }
    fn handle(&self, offset: u64) -> Option<Handle> {
        Some(Handle {
            path: self.path.to_string_lossy().into_owned(),
            offset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_commit_write_release() {
        let mut b = CpuBackend::new(1 << 20).unwrap();
        let p = b.page_size();
        b.commit(0, p).unwrap();
        b.write(10, b"hello").unwrap();
        let mut buf = [0u8; 5];
        b.read(10, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        b.release(0, p);
        // MADV_FREE: the page is the kernel's to take; a new commit makes it usable again.
        b.commit(0, p).unwrap();
        b.write(10, b"again").unwrap();
        b.read(10, &mut buf).unwrap();
        assert_eq!(&buf, b"again");
    }

    /// A worker starting while another opens its state directory's file never takes that file
    /// for one whose directory is gone (it read the note empty, half written, or missing after
    /// the file was made: CI saw a state file vanish under a running worker).
    #[test]
    fn a_state_file_being_opened_is_never_taken_for_a_stale_one() {
        let base = std::env::temp_dir().join(format!("memcoord-note-race-{}", std::process::id()));
        let (shm_dir, state_dir) = (base.join("shm"), base.join("state"));
        std::fs::create_dir_all(&shm_dir).unwrap();
        std::fs::create_dir_all(&state_dir).unwrap();
        let file = shm_dir.join("memcoord-state-0123456789abcdef-shm");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let scanner = {
            let (stop, shm_dir) = (stop.clone(), shm_dir.clone());
            std::thread::spawn(move || {
                let mut removed = 0;
                while !stop.load(Ordering::Relaxed) {
                    removed += remove_stale_shm_files(&shm_dir);
                }
                removed
            })
        };
        for _ in 0..300 {
            let b =
                ShmBackend::open_persistent(&file, 1 << 16, DEFAULT_SHM_MODE, &state_dir).unwrap();
            assert!(
                file.exists(),
                "the file of a live state directory was removed"
            );
            drop(b);
        }
        stop.store(true, Ordering::Relaxed);
        assert_eq!(scanner.join().unwrap(), 0);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn stale_files_of_dead_workers_are_removed() {
        let dir = std::env::temp_dir().join(format!("memcoord-stale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // pid 0 never names a worker process.
        std::fs::write(dir.join("memcoord-999999999-0-shm"), b"x").unwrap();
        std::fs::write(
            dir.join(format!("memcoord-{}-0-shm", std::process::id())),
            b"x",
        )
        .unwrap();
        std::fs::write(dir.join("unrelated-file"), b"x").unwrap();
        assert_eq!(remove_stale_shm_files(&dir), 1);
        assert!(dir.join("unrelated-file").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shm_file_is_shared_and_removed() {
        let mut b = ShmBackend::new(Path::new("/dev/shm"), 1 << 20, DEFAULT_SHM_MODE).unwrap();
        let path = b.path().to_path_buf();
        b.commit(0, b.page_size()).unwrap();
        b.write(100, b"shared").unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[100..106], b"shared");
        assert_eq!(b.handle(100).unwrap().offset, 100);
        drop(b);
        assert!(!path.exists());
    }
}

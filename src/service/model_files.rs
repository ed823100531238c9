//! Model files: opened beneath the model root without following links out of it, checked as the
//! file that was opened (not by its name), and read with `pread` so that a file shortened while
//! it loads is an error, never a signal.
//!
//! Why not a mapping: a file mapped while another process truncates it (`cp other victim`,
//! `truncate`) raises SIGBUS on the first access past the new end, which kills the worker and
//! everything it holds for every client. `pread` reports the same event as a short read.
//!
//! Why not canonicalize-then-open: a directory swapped for a symlink between the check and the
//! open loads a file outside the root. The root is opened once, as a descriptor, and every file
//! is opened relative to it by the kernel (`openat2` with `RESOLVE_BENEATH`), so the name that
//! was checked is the file that is read.
//!
//! The system calls `std` lacks (openat2, the O_NOFOLLOW walk) are in `backends::files`, with
//! the crate's other `unsafe` code.

use crate::backends::files::{Refused, clear_nonblock, open_beneath};
use crate::protocol::{ErrorCode, ProtocolError};
use parking_lot::Mutex;
use safetensors::tensor::TensorInfo;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn load_failed(message: impl Into<String>) -> ProtocolError {
    ProtocolError::new(ErrorCode::ModelLoadFailed, message)
}

/// The folder model files are loaded from, opened once (on the first load that finds it).
pub(crate) struct ModelRoot {
    /// As configured (`--model-root`), for messages and for absolute paths inside it.
    configured: PathBuf,
    open: Mutex<Option<Arc<OpenRoot>>>,
}

struct OpenRoot {
    dir: File,
    /// Its canonical path when it was opened.
    canonical: PathBuf,
}

impl ModelRoot {
    pub(crate) fn new(configured: PathBuf) -> Self {
        ModelRoot {
            configured,
            open: Mutex::new(None),
        }
    }

    /// The root's descriptor, opened on first use and kept: a root that does not exist yet
    /// (the worker was started first) is looked for again by the next load.
    fn root(&self) -> Result<Arc<OpenRoot>, ProtocolError> {
        let mut open = self.open.lock();
        if let Some(r) = open.as_ref() {
            return Ok(r.clone());
        }
        let unusable = |e: io::Error| {
            load_failed(format!(
                "the model root {} is not usable: {e}",
                self.configured.display()
            ))
        };
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(&self.configured)
            .map_err(unusable)?;
        let canonical = fd_path(&dir).unwrap_or_else(|| {
            self.configured
                .canonicalize()
                .unwrap_or_else(|_| self.configured.clone())
        });
        let r = Arc::new(OpenRoot { dir, canonical });
        *open = Some(r.clone());
        Ok(r)
    }

    /// Opens `path` (relative to the root; an absolute path only where it names something
    /// inside the root) for reading, without leaving the root by `..` or by a symlink, and
    /// checks that what was opened is a regular file.
    pub(crate) fn open(&self, path: &str) -> Result<ModelFile, ProtocolError> {
        let root = self.root()?;
        let outside = || {
            load_failed(format!(
                "{path} resolves outside the model root {}",
                root.canonical.display()
            ))
        };
        let rel: PathBuf = {
            let p = Path::new(path);
            if p.is_absolute() {
                // Only a name under the root's own path is taken, and then resolved beneath
                // the root's descriptor like any other: the name is a convenience, not a check.
                let under = p
                    .strip_prefix(&root.canonical)
                    .ok()
                    .or_else(|| p.strip_prefix(&self.configured).ok())
                    .ok_or_else(outside)?;
                under.to_path_buf()
            } else {
                p.to_path_buf()
            }
        };
        let rel = if rel.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            rel
        };
        let cannot =
            |e: io::Error| load_failed(format!("cannot open {path} under the model root: {e}"));
        let c_rel = CString::new(rel.as_os_str().as_bytes())
            .map_err(|_| cannot(io::Error::other("the path contains a NUL byte")))?;
        let file = match open_beneath(&root.dir, &c_rel) {
            Err(Refused::Outside) => return Err(outside()),
            Err(Refused::Io(e)) => return Err(cannot(e)),
            Err(Refused::Symlink(name)) => {
                return Err(load_failed(format!(
                    "cannot open {path} under the model root: {name} is a symbolic link or not \
                     a folder, and this kernel has no openat2 (Linux 5.6), without which \
                     memcoord follows no links in the model root; name the file by its real \
                     path"
                )));
            }
            Ok(f) => f,
        };
        let meta = file.metadata().map_err(cannot)?;
        if !meta.file_type().is_file() {
            return Err(load_failed(format!(
                "{path} is not a file (a regular file holding safetensors is expected)"
            )));
        }
        // Opened with O_NONBLOCK so that a FIFO could not stall the open; a regular file reads
        // the same either way, but clear it so that no filesystem sees it.
        clear_nonblock(&file);
        let real = fd_path(&file).unwrap_or_else(|| root.canonical.join(&rel));
        Ok(ModelFile {
            stamp: Stamp::of(&meta),
            len: meta.len(),
            file,
            path: real,
        })
    }
}

/// The path the kernel has for an open descriptor (symlinks resolved), where /proc is mounted.
fn fd_path(f: &File) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).ok()
}

/// What tells a rewritten file from the one opened: a write or a truncate in place changes its
/// size or its modification time. (Not the change time: `chmod` or a new hard link moves it
/// and changes no byte.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
        }
    }
}

/// An opened model file.
pub(crate) struct ModelFile {
    file: File,
    /// Its real path (symlinks resolved), for messages and the model's `path`.
    path: PathBuf,
    /// Its length when it was opened.
    len: u64,
    stamp: Stamp,
}

/// One tensor of a header: its name and where its bytes are in the file.
pub(crate) struct Tensor {
    pub(crate) name: String,
    /// Its dtype as the header writes it (`F16`, `BF16`, `F32`, …).
    pub(crate) dtype: String,
    /// Its dimensions, from the header.
    pub(crate) shape: Vec<u64>,
    /// Offset of its first byte in the file.
    pub(crate) start: u64,
    /// Its length in bytes.
    pub(crate) len: u64,
}

/// The largest header read (the safetensors crate's limit): a header length above it is taken
/// for a file that is not safetensors, rather than read.
const MAX_HEADER_BYTES: u64 = 100_000_000;

impl ModelFile {
    /// The real path of the file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn invalid(&self, why: impl std::fmt::Display) -> ProtocolError {
        load_failed(format!(
            "{} is not a valid safetensors file: {why}",
            self.path.display()
        ))
    }

    /// Reads and checks the header (8-byte little-endian length, then JSON): every tensor's
    /// dtype × shape is its byte length, the tensors' data follow each other without gaps or
    /// overlaps, the last ends at the end of the file, and no tensor name appears twice.
    /// Returns the tensors in file order.
    pub(crate) fn header(&self) -> Result<Vec<Tensor>, ProtocolError> {
        if self.len < 8 {
            return Err(self.invalid(format!(
                "it is {} bytes, shorter than the 8-byte header length it must start with",
                self.len
            )));
        }
        let mut n = [0u8; 8];
        self.read_at(0, &mut n, 8)?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER_BYTES {
            return Err(self.invalid(format!(
                "it starts with a header length of {n} bytes, more than the {MAX_HEADER_BYTES} \
                 a safetensors header may have"
            )));
        }
        if 8 + n > self.len {
            return Err(self.invalid(format!(
                "its header length is {n} bytes, but the file is only {} bytes",
                self.len
            )));
        }
        let mut header = vec![0u8; n as usize];
        self.read_at(8, &mut header, 8 + n)?;
        let text = std::str::from_utf8(&header)
            .map_err(|e| self.invalid(format!("invalid UTF-8 in header: {e}")))?;
        let HeaderEntries(mut entries) = serde_json::from_str(text).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => self.invalid(format!("invalid header: {e}")),
                _ => self.invalid(format!("invalid JSON in header: {e}")),
            }
        })?;
        entries.sort_by_key(|(_, info)| info.data_offsets);
        let data_start = 8 + n;
        let mut end = 0u64;
        let mut tensors = Vec::with_capacity(entries.len());
        for (name, info) in entries {
            let (s, e) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
            if e < s {
                return Err(self.invalid(format!(
                    "tensor `{name}` has data_offsets [{s}, {e}], which end before they start"
                )));
            }
            if s != end {
                return Err(self.invalid(format!(
                    "tensor `{name}` starts at byte {s} of the data, where {end} was expected: \
                     the tensors' data_offsets must cover the data without gaps or overlaps"
                )));
            }
            let bytes = info
                .shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
                .and_then(|elements| elements.checked_mul(info.dtype.bitsize() as u64))
                .filter(|bits| bits % 8 == 0)
                .map(|bits| bits / 8)
                .ok_or_else(|| {
                    self.invalid(format!(
                        "tensor `{name}` ({}, shape {:?}) does not have a whole number of bytes",
                        info.dtype, info.shape
                    ))
                })?;
            if bytes != e - s {
                return Err(self.invalid(format!(
                    "tensor `{name}` is {} with shape {:?}, which is {bytes} bytes, but its \
                     data_offsets [{s}, {e}] hold {}",
                    info.dtype,
                    info.shape,
                    e - s
                )));
            }
            end = e;
            tensors.push(Tensor {
                dtype: info.dtype.to_string(),
                shape: info.shape.iter().map(|&d| d as u64).collect(),
                name,
                start: data_start + s,
                len: e - s,
            });
        }
        let needs = data_start + end;
        if needs != self.len {
            return Err(self.invalid(format!(
                "its header describes {needs} bytes (8 + a {n}-byte header + {end} bytes of \
                 tensors), but the file is {} bytes{}",
                self.len,
                if needs > self.len {
                    " (cut short?)"
                } else {
                    ""
                }
            )));
        }
        Ok(tensors)
    }

    /// Fills `buf` with the file's bytes from `at`. A short read (the file shrank since it was
    /// opened) is an error saying so; `needs` is the length the file must have.
    pub(crate) fn read_at(&self, at: u64, buf: &mut [u8], needs: u64) -> Result<(), ProtocolError> {
        self.file
            .read_exact_at(buf, at)
            .map_err(|e| self.read_error(e, needs))
    }

    /// The source of a tensor's bytes, for [`crate::backends::Backend::write_with`].
    pub(crate) fn reader<'a>(
        &'a self,
        tensor: &'a Tensor,
    ) -> impl Fn(u64, &mut [u8]) -> io::Result<()> + Sync + 'a {
        move |at, buf| self.file.read_exact_at(buf, tensor.start + at)
    }

    /// The error for a failed read of the file, which must be `needs` bytes long.
    pub(crate) fn read_error(&self, e: io::Error, needs: u64) -> ProtocolError {
        let now = self.file.metadata().map(|m| m.len()).ok();
        match now {
            Some(now) if e.kind() == io::ErrorKind::UnexpectedEof || now < needs => {
                self.changed(format!("it is {now} bytes now, the header needs {needs}"))
            }
            _ => load_failed(format!("reading {} failed: {e}", self.path.display())),
        }
    }

    fn changed(&self, how: String) -> ProtocolError {
        load_failed(format!(
            "{} changed while loading ({how}): load it again once it is written",
            self.path.display()
        ))
    }

    /// Fails when the file is not as it was opened (its size or modification time moved): it
    /// was rewritten in place while it loaded, and the bytes read may mix two versions. A
    /// rewrite of the same size within the filesystem's timestamp granularity of the open
    /// could go unseen (kernels since 6.13 give a write after a `stat` a timestamp of its own
    /// on the common filesystems); replacing a model file by renaming a new one over it is
    /// always safe.
    pub(crate) fn check_unchanged(&self) -> Result<(), ProtocolError> {
        let now = self
            .file
            .metadata()
            .map_err(|e| load_failed(format!("reading {} failed: {e}", self.path.display())))?;
        let now = Stamp::of(&now);
        if now == self.stamp {
            return Ok(());
        }
        Err(self.changed(if now.len != self.stamp.len {
            format!("it is {} bytes now, it was {}", now.len, self.stamp.len)
        } else {
            "it was written to while it was read".to_string()
        }))
    }
}

/// The header's top-level object as (name, tensor) pairs, `__metadata__` checked and dropped;
/// a name that appears twice is an error (a map would keep the last silently).
struct HeaderEntries(Vec<(String, TensorInfo)>);

impl<'de> serde::Deserialize<'de> for HeaderEntries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = HeaderEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of tensors by name")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<HeaderEntries, A::Error> {
                let mut seen = std::collections::HashSet::new();
                let mut out = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(serde::de::Error::custom(format!(
                            "the name `{key}` appears twice (each tensor needs a name of its \
                             own)"
                        )));
                    }
                    if key == "__metadata__" {
                        map.next_value::<Option<std::collections::HashMap<String, String>>>()?;
                    } else {
                        out.push((key, map.next_value::<TensorInfo>()?));
                    }
                }
                Ok(HeaderEntries(out))
            }
        }
        d.deserialize_map(Entries)
    }
}

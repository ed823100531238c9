//! `--state-dir`: persistent `shm` allocations outlive the worker, gracefully stopped or killed.
//! The state file (`DIR/state.json`) lists them (id, offset, size, type, purpose) with the key
//! their ids were minted with; it is rewritten, atomically (temporary file + fsync + rename),
//! before the answer of any request that made or freed one goes out (and before a transfer
//! that moved one reads Completed, waited for or not), so a SIGKILL can never lose an
//! allocation a host was told about. The next worker with the same directory adopts them:
//! same ids, same bytes (the `shm` file is kept), same handles.
//!
//! Order matters: the memory of a persistent allocation that is freed or moved away is given
//! back (or reused) only after a state file that no longer lists it is in place, so a crash
//! between the two never leaves a state file naming memory that is gone. An allocation listed
//! but whose pages are gone anyway (the `shm` file was removed, as a reboot clears /dev/shm)
//! is dropped with an error in the log, never served as zeros.
//!
//! The service records it itself: every operation that may change persistent allocations
//! holds a [`Recorded`] guard, which writes the state file (when anything changed) as the
//! operation returns, before its caller can answer. So a library user of [`MemoryService`]
//! with a state directory persists exactly as the worker does, and background work (a
//! scheduled optimize, a transfer nobody waits for) is recorded when it ends.

use super::MemoryService;
use crate::managers::allocations::Adopted;
use crate::managers::{AllocationSpec, Owner};
use crate::protocol::MemoryAllocationType;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use uuid::Uuid;

const STATE_FILE: &str = "state.json";

#[derive(Serialize, Deserialize)]
struct SavedAllocation {
    allocation_id: Uuid,
    offset: u64,
    size_bytes: u64,
    alignment: u64,
    allocation_type: MemoryAllocationType,
    purpose: String,
    created_us: u64,
    /// The tenant that made it (state files written before tenants had none: `default`).
    #[serde(default = "default_tenant")]
    tenant: String,
}

fn default_tenant() -> String {
    crate::domain::DEFAULT_TENANT.to_string()
}

#[derive(Serialize, Deserialize)]
struct Saved {
    version: u32,
    id_key: u32,
    allocations: Vec<SavedAllocation>,
}

/// Called right after a state file is in place and before the memory it no longer lists is
/// given back (a seam for tests that crash the worker exactly there).
pub type StateWrittenHook = Box<dyn Fn() + Send + Sync>;

/// Where the state goes and what was last written.
pub(super) struct StateDir {
    dir: PathBuf,
    device: usize,
    written: Mutex<Option<u64>>,
    on_written: Option<StateWrittenHook>,
    /// Holds an exclusive lock on `DIR/lock` for the worker's life: one worker per directory.
    _lock: std::fs::File,
}

impl StateDir {
    /// The device whose persistent allocations are kept (`shm`).
    pub(super) fn device(&self) -> usize {
        self.device
    }
}

/// Why a state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing it failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a state file of this version.
    #[error("{path}: not a memcoord state file ({reason})")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The allocations it lists cannot be taken over.
    #[error("{0}")]
    Adopt(String),
}

/// Takes `DIR/lock` exclusively (`File::try_lock`, flock on Linux: released by the kernel when
/// the process ends, killed or not), or says which worker holds it.
fn lock_dir(dir: &Path) -> Result<std::fs::File, StateError> {
    let path = dir.join("lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|source| StateError::Io {
            path: path.display().to_string(),
            source,
        })?;
    // 0600 also for a lock file an older worker made with the umask's mode.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|source| StateError::Io {
            path: path.display().to_string(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::Error(source)) => {
            return Err(StateError::Io {
                path: path.display().to_string(),
                source,
            });
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(StateError::Adopt(format!(
                "{} is in use by another worker{}: each worker needs its own --state-dir",
                dir.display(),
                match holder.trim() {
                    "" => String::new(),
                    pid => format!(" (pid {pid})"),
                }
            )));
        }
    }
    let _ = file.set_len(0);
    let _ = write!(file, "{}", std::process::id());
    Ok(file)
}

/// Creates `dir` (and its parents) if missing, mode 0700 whatever the umask (it can only take
/// bits away): the directory holds the record of every persistent allocation.
///
/// An existing directory is checked. Writable by its group or others (mode `0775`, `0777`, a
/// shared directory like /tmp), it is refused: another local user could put a `state.json` of
/// their own there and make the worker adopt allocations it never made. Readable or searchable
/// by them (`0755`), it is tightened to 0700, with a warning in the log; where that fails (not
/// the owner) the warning says so, and the files themselves stay 0600.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let meta = match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
            {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            std::fs::metadata(dir)?
        }
        other => other?,
    };
    if !meta.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            "not a directory",
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        let who = match mode & 0o022 {
            0o020 => "its group",
            0o002 => "every local user",
            _ => "its group and every local user",
        };
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "the directory is writable by {who} (mode {mode:04o}), who could replace \
                 state.json and make this worker adopt allocations it never made; give the \
                 worker a directory of its own (`mkdir -m 700 DIR`, or `chmod 700` this one)"
            ),
        ));
    }
    if mode & 0o077 != 0 {
        let tight = mode & !0o077;
        match std::fs::set_permissions(dir, std::fs::Permissions::from_mode(tight)) {
            Ok(()) => tracing::warn!(
                "--state-dir {}: tightened from mode {mode:04o} to {tight:04o}: it holds the \
                 record of every persistent allocation, for this user only",
                dir.display()
            ),
            Err(e) => tracing::warn!(
                "--state-dir {} is mode {mode:04o}, open to other local users, and could not \
                 be tightened to 0700 ({e}); its files stay 0600, but run `chmod 700` on it",
                dir.display()
            ),
        }
    }
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    {
        // The owner's only from its first byte: created with mode 0600 (the umask can only take
        // bits away), never widened then narrowed. A temporary file left by a crash, which may
        // have another mode, is removed first, so this one is always new.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Records the state file when dropped (see the module's note); held by every service
/// operation that may change persistent allocations, from its first line, so each way out of
/// it (an error returned early, a waiting future dropped) records too.
pub(super) struct Recorded<'a>(&'a MemoryService);

impl Drop for Recorded<'_> {
    fn drop(&mut self) {
        self.0.record_state();
    }
}

impl MemoryService {
    /// The guard that records persistent state when the operation holding it ends.
    pub(super) fn recording(&self) -> Recorded<'_> {
        Recorded(self)
    }

    /// Keeps persistent `shm` allocations in `dir` (created if missing): adopts what an
    /// earlier worker left there, and records every change from now on. The service's `shm`
    /// device must have been made over the directory's file (`Settings::state_dir`). Returns
    /// how many allocations were adopted.
    pub fn with_state_dir(mut self, dir: &Path) -> Result<(Self, usize), StateError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| StateError::Io { path, source }
        };
        create_private_dir(dir).map_err(io(dir))?;
        let lock = lock_dir(dir)?;
        let path = dir.join(STATE_FILE);
        let device = self
            .engine
            .lock()
            .device_index("shm")
            .map_err(|e| StateError::Adopt(e.to_string()))?;
        let mut adopted = 0;
        match std::fs::read(&path) {
            Ok(bytes) => {
                let saved: Saved =
                    serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    })?;
                if saved.version != 1 {
                    return Err(StateError::Corrupt {
                        path: path.display().to_string(),
                        reason: format!("version {}", saved.version),
                    });
                }
                let shm_file = self
                    .engine
                    .lock()
                    .handle_path(device)
                    .ok_or_else(|| StateError::Adopt("shm has no file".into()))?;
                // Opened once for every listed allocation; one that cannot be checked counts as
                // lost (never served unchecked).
                let file = std::fs::File::open(&shm_file).and_then(|f| {
                    let len = f.metadata()?.len();
                    Ok((f, len))
                });
                let (kept, lost): (Vec<SavedAllocation>, Vec<SavedAllocation>) =
                    saved.allocations.into_iter().partition(|a| match &file {
                        Ok((f, len)) => !crate::backends::has_hole(f, *len, a.offset, a.size_bytes)
                            .unwrap_or(true),
                        Err(_) => false,
                    });
                if !lost.is_empty() {
                    let bytes: u64 = lost.iter().map(|a| a.size_bytes).sum();
                    tracing::error!(
                        "{}: {} persistent shm allocations ({}) are listed but their bytes are \
                         gone from {} (the file was removed, as a reboot clears /dev/shm, or its \
                         pages were given back): dropped, not served as zeros: {}",
                        path.display(),
                        lost.len(),
                        crate::units::format_bytes(bytes),
                        shm_file.display(),
                        lost.iter()
                            .map(|a| a.allocation_id.hyphenated().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                let items: Vec<Adopted> = kept
                    .into_iter()
                    .map(|a| Adopted {
                        id: a.allocation_id,
                        offset: a.offset,
                        spec: AllocationSpec {
                            size: a.size_bytes,
                            alignment: a.alignment,
                            kind: a.allocation_type,
                            purpose: a.purpose,
                            persistent: true,
                            owner: Owner::Client,
                            holder: crate::domain::Caller::of_tenant(&a.tenant),
                        },
                        created_us: a.created_us,
                    })
                    .collect();
                let mut e = self.engine.lock();
                e.set_id_key(saved.id_key);
                adopted = e
                    .adopt(device, items)
                    .map_err(|e| StateError::Adopt(format!("{}: {e}", path.display())))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
        self.engine.lock().set_durable(device);
        self.state = Some(StateDir {
            dir: dir.to_path_buf(),
            device,
            written: Mutex::new(None),
            on_written: None,
            _lock: lock,
        });
        self.save_state().map_err(io(&path))?;
        Ok((self, adopted))
    }

    /// Whether persistent `shm` allocations are kept in a state directory.
    pub fn has_state(&self) -> bool {
        self.state.is_some()
    }

    /// Calls `hook` each time a state file is in place, before the memory it no longer lists
    /// is given back (after [`MemoryService::with_state_dir`]).
    pub fn on_state_written(mut self, hook: StateWrittenHook) -> Self {
        if let Some(state) = &mut self.state {
            state.on_written = Some(hook);
        }
        self
    }

    /// [`MemoryService::save_state`], with a failure logged: the worker goes on, and the
    /// memory of freed persistent allocations stays held until a later write succeeds.
    pub fn record_state(&self) {
        if let Err(e) = self.save_state() {
            tracing::error!("could not record persistent shm allocations: {e}");
        }
    }

    /// Writes the state file if persistent `shm` allocations changed since it was last
    /// written. Cheap when nothing changed (one look at a counter).
    pub fn save_state(&self) -> std::io::Result<()> {
        let Some(state) = &self.state else {
            return Ok(());
        };
        let mut written = state.written.lock();
        let (generation, saved) = {
            let e = self.engine.lock();
            let generation = e.persistent_changes(state.device);
            if *written == Some(generation) {
                return Ok(());
            }
            let saved = Saved {
                version: 1,
                id_key: e.id_key(),
                allocations: e
                    .persistent_state(state.device)
                    .into_iter()
                    .map(|a| SavedAllocation {
                        allocation_id: a.id,
                        offset: a.offset,
                        size_bytes: a.spec.size,
                        alignment: a.spec.alignment,
                        allocation_type: a.spec.kind,
                        purpose: a.spec.purpose,
                        created_us: a.created_us,
                        tenant: a.spec.holder.tenant.to_string(),
                    })
                    .collect(),
            };
            (generation, saved)
        };
        let bytes = serde_json::to_vec_pretty(&saved).map_err(std::io::Error::other)?;
        write_atomically(&state.dir.join(STATE_FILE), &bytes)?;
        *written = Some(generation);
        if let Some(hook) = &state.on_written {
            hook();
        }
        // Only now may the memory of what the file no longer lists go back, or be reused.
        self.engine.lock().release_held(state.device, generation);
        Ok(())
    }
}

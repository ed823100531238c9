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
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
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

/// Creates `dir` (and its parents) if missing; the directory itself is made 0700: it holds the
/// record of every persistent allocation. An existing directory keeps its mode.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    {
        // The owner's only: the file names every persistent allocation and where it lies.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
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
                            holder: crate::domain::Caller::anonymous(),
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

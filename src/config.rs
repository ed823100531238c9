//! Settings: device budgets and worker limits, from `--budget`/`--config` and defaults.

use crate::backends::{
    Backend, CpuBackend, DEFAULT_SHM_MODE, MemoryLimit, ShmBackend, cgroup_memory_limit, cuda,
    meminfo, remove_stale_shm_files, tmpfs_capacity,
};
use crate::domain::{ADMIN_TENANT, DEFAULT_TENANT, TenantSpec};
use crate::managers::DeviceSetup;
use crate::units::{format_bytes, parse_size};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Host device ids, in the order they are listed.
pub const HOST_DEVICES: [&str; 2] = ["cpu", "shm"];

/// What went wrong reading settings or creating devices.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML of the expected shape.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A bad `DEVICE=SIZE` or size.
    #[error("{0}")]
    Budget(String),
    /// A device could not be created.
    #[error(transparent)]
    Backend(#[from] crate::backends::BackendError),
}

/// A size written as bytes (integer) or text (`"8GiB"`) in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    budgets: BTreeMap<String, SizeValue>,
    max_line_bytes: Option<SizeValue>,
    shm_dir: Option<PathBuf>,
    #[serde(default)]
    tenants: BTreeMap<String, TenantFile>,
}

/// One `[tenants.NAME]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantFile {
    token_file: Option<PathBuf>,
    #[serde(default)]
    quota: BTreeMap<String, SizeValue>,
}

/// The worker's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Budgets by device id; devices not named get their default.
    pub budgets: BTreeMap<String, u64>,
    /// The stdio line limit.
    pub max_line_bytes: usize,
    /// Where the `shm` device's file lives.
    pub shm_dir: PathBuf,
    /// Where persistent `shm` allocations are recorded so they outlive the worker
    /// (`--state-dir`); None: nothing outlives it.
    pub state_dir: Option<PathBuf>,
    /// Do not look for GPUs.
    pub no_gpu: bool,
    /// Bytes of page-locked host memory for `cpu` allocations of type `Staging` when there is
    /// a GPU (default [`DEFAULT_PINNED_POOL`], at most a quarter of the `cpu` budget; 0: none).
    pub pinned_pool: Option<u64>,
    /// Permissions of the `shm` file (default [`DEFAULT_SHM_MODE`], the owner's only).
    pub shm_mode: u32,
    /// The memory limit of this process's cgroup (read when the settings are made), which
    /// host memory (`cpu` and `shm` pages alike) is charged to: it caps the default `cpu` and
    /// `shm` budgets, and a budget above it is refused. `None`: no limit.
    pub memory_limit: Option<MemoryLimit>,
    /// Declared tenants (`[tenants.NAME]`), their tokens read (section 8.2); empty: none.
    pub tenants: BTreeMap<String, TenantSpec>,
}

/// The default pinned pool beside a GPU.
pub const DEFAULT_PINNED_POOL: u64 = 2 << 30;

impl Default for Settings {
    fn default() -> Self {
        Settings {
            budgets: BTreeMap::new(),
            max_line_bytes: 1 << 20,
            shm_dir: PathBuf::from("/dev/shm"),
            state_dir: None,
            no_gpu: false,
            pinned_pool: None,
            shm_mode: DEFAULT_SHM_MODE,
            memory_limit: cgroup_memory_limit(),
            tenants: BTreeMap::new(),
        }
    }
}

fn size_value(v: &SizeValue, what: &str) -> Result<u64, ConfigError> {
    match v {
        SizeValue::Bytes(b) => Ok(*b),
        SizeValue::Text(t) => {
            parse_size(t).map_err(|e| ConfigError::Budget(format!("{what}: {e}")))
        }
    }
}

/// A `[tenants.NAME]` table checked, its token file read (trimmed). Only `default` may go
/// without a token file (it is the tenant of requests that carry no token).
fn tenant_spec(name: &str, t: &TenantFile) -> Result<TenantSpec, String> {
    let valid_name = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !valid_name {
        return Err(format!(
            "[tenants.{name}]: a tenant's name is letters, digits, `-`, `_` and `.`"
        ));
    }
    if name == ADMIN_TENANT {
        return Err(format!(
            "[tenants.{ADMIN_TENANT}]: `{ADMIN_TENANT}` is the operator (the token of \
             --token-file); give the tenant another name"
        ));
    }
    let token = match &t.token_file {
        Some(file) => {
            let text = std::fs::read_to_string(file).map_err(|e| {
                format!(
                    "[tenants.{name}] token_file {}: cannot read it: {e}",
                    file.display()
                )
            })?;
            let token = text.trim();
            if token.is_empty() {
                return Err(format!(
                    "[tenants.{name}] token_file {}: the file is empty; write the tenant's \
                     token in it",
                    file.display()
                ));
            }
            Some(token.to_string())
        }
        None if name == DEFAULT_TENANT => None,
        None => {
            return Err(format!(
                "[tenants.{name}]: token_file is missing (the file that holds the tenant's \
                 bearer token); only [tenants.{DEFAULT_TENANT}] goes without one"
            ));
        }
    };
    let mut quota = BTreeMap::new();
    for (device, size) in &t.quota {
        check_device(device).map_err(|e| format!("[tenants.{name}] quota: {e}"))?;
        let bytes = size_value(size, &format!("[tenants.{name}] quota of {device}"))
            .map_err(|e| e.to_string())?;
        quota.insert(device.clone(), bytes);
    }
    Ok(TenantSpec { token, quota })
}

fn check_device(device: &str) -> Result<(), ConfigError> {
    let gpu = device
        .strip_prefix("cuda:")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if HOST_DEVICES.contains(&device) || gpu {
        Ok(())
    } else {
        Err(ConfigError::Budget(format!(
            "unknown device `{device}` in a budget: devices are {} and cuda:N",
            HOST_DEVICES.join(", ")
        )))
    }
}

/// The default budget of a GPU: 90% of its memory (the rest is left to contexts and other
/// processes' fixed overheads).
pub fn default_gpu_budget(total_memory: u64) -> u64 {
    total_memory / 10 * 9
}

impl Settings {
    /// Reads a TOML config file over the defaults.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file: ConfigFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut s = Settings::default();
        for (device, size) in &file.budgets {
            check_device(device)?;
            let bytes = size_value(size, &format!("budget of {device}"))?;
            s.check_limit(device, bytes)
                .map_err(|e| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
            s.budgets.insert(device.clone(), bytes);
        }
        if let Some(m) = &file.max_line_bytes {
            s.max_line_bytes = size_value(m, "max_line_bytes")? as usize;
        }
        if let Some(dir) = file.shm_dir {
            s.shm_dir = dir;
        }
        let mut tokens: BTreeMap<String, String> = BTreeMap::new();
        for (name, t) in &file.tenants {
            let spec = tenant_spec(name, t).map_err(|message| ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            })?;
            if let Some(token) = &spec.token
                && let Some(other) = tokens.insert(token.clone(), name.clone())
            {
                return Err(ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: format!(
                        "tenants `{other}` and `{name}` have the same token: give each tenant \
                         its own token file with a different token"
                    ),
                });
            }
            s.tenants.insert(name.clone(), spec);
        }
        Ok(s)
    }

    /// Sets the `shm` file's permissions from octal text (`0640`, `0660`, `0o660`): read and
    /// write for the owner, and at most read and write for the group and read for others. A
    /// world-writable mode, execute bits or the setuid, setgid and sticky bits are refused: whoever
    /// can open the file reads (and with write, changes) every `shm` allocation, model weights
    /// and client data alike.
    pub fn set_shm_mode(&mut self, text: &str) -> Result<(), ConfigError> {
        self.shm_mode = parse_shm_mode(text).map_err(|why| {
            ConfigError::Budget(format!(
                "--shm-mode `{text}`: {why} (allowed: 0600, the default, up to 0664; \
                 e.g. 0640 to let the group read allocations, 0660 to let it write them too)"
            ))
        })?;
        Ok(())
    }

    /// Applies one `DEVICE=SIZE` from the command line.
    pub fn set_budget(&mut self, spec: &str) -> Result<(), ConfigError> {
        let (device, size) = spec.split_once('=').ok_or_else(|| {
            ConfigError::Budget(format!("`{spec}` is not DEVICE=SIZE (e.g. cpu=8GiB)"))
        })?;
        let device = device.trim();
        check_device(device)?;
        let bytes = parse_size(size)
            .map_err(|e| ConfigError::Budget(format!("budget of {device}: {e}")))?;
        self.check_limit(device, bytes)?;
        self.budgets.insert(device.to_string(), bytes);
        Ok(())
    }

    /// Refuses a host device's budget above the cgroup's memory limit: the kernel would kill
    /// the worker (every client's memory with it) before the budget was reached.
    pub fn check_limit(&self, device: &str, bytes: u64) -> Result<(), ConfigError> {
        match &self.memory_limit {
            Some(limit) if HOST_DEVICES.contains(&device) && bytes > limit.bytes => {
                Err(ConfigError::Budget(format!(
                    "the budget of {device}, {}, is above this process's memory limit of {limit}: \
                     the kernel would kill the worker before the budget is reached; give at most \
                     {} (or no budget: the default is half the limit)",
                    format_bytes(bytes),
                    format_bytes(limit.bytes)
                )))
            }
            _ => Ok(()),
        }
    }

    /// The capacity a host device's default budget is taken from: the device's, capped by the
    /// cgroup's memory limit.
    fn host_capacity(&self, device: &str) -> u64 {
        let total = self.host_total(device);
        self.memory_limit
            .as_ref()
            .map_or(total, |l| total.min(l.bytes))
    }

    /// A host device's own capacity: MemTotal for `cpu`, the tmpfs's size for `shm`.
    fn host_total(&self, device: &str) -> u64 {
        match device {
            "cpu" => meminfo().total,
            "shm" => tmpfs_capacity(&self.shm_dir).total,
            _ => 0,
        }
    }

    /// The budget of a host device: as set, else half of the device's capacity (a worker
    /// shares its machine), the capacity being at most the cgroup's memory limit (so the two
    /// default budgets together fit in it).
    pub fn budget(&self, device: &str) -> u64 {
        if let Some(b) = self.budgets.get(device) {
            return *b;
        }
        self.host_capacity(device) / 2
    }

    /// Which default budgets the cgroup's memory limit capped, for people (`memcoord devices`);
    /// `None` when it capped none.
    pub fn limit_note(&self) -> Option<String> {
        let limit = self.memory_limit.as_ref()?;
        let capped: Vec<&str> = HOST_DEVICES
            .into_iter()
            .filter(|d| !self.budgets.contains_key(*d))
            .filter(|d| self.host_total(d) > limit.bytes)
            .collect();
        (!capped.is_empty()).then(|| {
            let (what, verb) = match capped.as_slice() {
                [one] => (format!("the default budget of {one}"), "is"),
                _ => (
                    format!("the default budgets of {}", capped.join(" and ")),
                    "are",
                ),
            };
            format!("{what} {verb} capped by this process's memory limit of {limit} (half of it)")
        })
    }

    /// Creates every device: the host devices, then each GPU the CUDA driver reports (none,
    /// with the reason logged on stderr, where there is no driver or no GPU).
    pub fn devices(&self) -> Result<Vec<DeviceSetup>, ConfigError> {
        let mut devices = self.host_devices()?;
        if self.no_gpu {
            return Ok(devices);
        }
        let mut pool_made = false;
        match cuda::probe() {
            Ok(gpus) => {
                for gpu in gpus {
                    let id = format!("cuda:{}", gpu.ordinal);
                    let budget = self
                        .budgets
                        .get(&id)
                        .copied()
                        .unwrap_or_else(|| default_gpu_budget(gpu.total_memory));
                    match cuda::CudaBackend::new(
                        gpu.ordinal,
                        gpu.name.clone(),
                        budget.saturating_add(budget / 4),
                    ) {
                        Ok(backend) => {
                            if !pool_made {
                                pool_made = true;
                                self.attach_pinned_pool(&backend, &mut devices);
                            }
                            devices.push(DeviceSetup {
                                backend: Box::new(backend),
                                budget,
                                pinned: None,
                            });
                        }
                        Err(e) => tracing::warn!("{id} ({}) is not used: {e}", gpu.name),
                    }
                }
            }
            Err(reason) => tracing::warn!("no GPU devices: {reason}; serving host memory only"),
        }
        for id in self.budgets.keys() {
            if !devices.iter().any(|d| d.backend.device_id() == id) {
                tracing::warn!("a budget names {id}, which this machine does not have");
            }
        }
        Ok(devices)
    }

    fn attach_pinned_pool(&self, gpu: &cuda::CudaBackend, devices: &mut [DeviceSetup]) {
        let Some(cpu) = devices.iter_mut().find(|d| d.backend.device_id() == "cpu") else {
            return;
        };
        let len = self
            .pinned_pool
            .unwrap_or(DEFAULT_PINNED_POOL)
            .min(cpu.budget / 4);
        if len == 0 {
            return;
        }
        match gpu.pinned_pool(len) {
            Ok(pool) => cpu.pinned = Some(Box::new(pool)),
            Err(e) => tracing::warn!("no pinned pool for Staging allocations: {e}"),
        }
    }

    /// The `shm` file of a state directory: one per directory, named from its canonical path
    /// (FNV-1a; why not a crate: eight lines) so that the same `--state-dir` finds it again.
    pub fn state_shm_path(&self, state_dir: &std::path::Path) -> PathBuf {
        let canonical =
            std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in canonical.to_string_lossy().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.shm_dir.join(format!("memcoord-state-{h:016x}-shm"))
    }

    /// Creates the host devices with their budgets.
    pub fn host_devices(&self) -> Result<Vec<DeviceSetup>, ConfigError> {
        for (device, bytes) in &self.budgets {
            self.check_limit(device, *bytes)?;
        }
        if let Some(limit) = &self.memory_limit {
            let together = self.budget("cpu").saturating_add(self.budget("shm"));
            if together > limit.bytes {
                tracing::warn!(
                    "the cpu and shm budgets together ({}) are above this process's memory limit of \
                     {limit}: filling both would get the worker killed",
                    format_bytes(together)
                );
            }
        }
        remove_stale_shm_files(&self.shm_dir);
        let mut devices = Vec::new();
        for device in HOST_DEVICES {
            let budget = self.budget(device);
            if budget == 0 {
                return Err(ConfigError::Budget(format!(
                    "the budget of {device} is 0 bytes: give it at least one page"
                )));
            }
            // The arena's range is a quarter larger than the budget: address space (and a sparse
            // file) cost nothing until backed, and the sub-allocator's size classes round a
            // request up by up to 1/8, so this lets any request within the budget fit an empty
            // arena. The budget, not the range, bounds what is held.
            let range = budget.saturating_add(budget / 4);
            let backend: Box<dyn Backend> = match device {
                "cpu" => Box::new(CpuBackend::new(range)?),
                _ => match &self.state_dir {
                    Some(state) => Box::new(ShmBackend::open_persistent(
                        &self.state_shm_path(state),
                        range,
                        self.shm_mode,
                        state,
                    )?),
                    None => Box::new(ShmBackend::new(&self.shm_dir, range, self.shm_mode)?),
                },
            };
            tracing::debug!("{device}: budget {}", format_bytes(budget));
            devices.push(DeviceSetup {
                backend,
                budget,
                pinned: None,
            });
        }
        Ok(devices)
    }
}

/// The mode `--shm-mode` text stands for, or why it is refused.
fn parse_shm_mode(text: &str) -> Result<u32, &'static str> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return Err("not a file mode in octal");
    }
    let mode = u32::from_str_radix(digits, 8).map_err(|_| "not a file mode in octal")?;
    if mode & 0o7000 != 0 {
        return Err("setuid, setgid and sticky bits have no place on a memory file");
    }
    if mode & 0o111 != 0 {
        return Err("execute bits have no place on a memory file");
    }
    if mode & 0o002 != 0 {
        return Err("world-writable: every local user could change model weights and client data");
    }
    if mode & 0o600 != 0o600 {
        return Err("the owner (memcoord itself) must be able to read and write it");
    }
    Ok(mode)
}

#[cfg(test)]
mod tests {

    #[test]
    fn shm_modes_widen_within_limits() {
        for (text, mode) in [
            ("0600", 0o600),
            ("600", 0o600),
            ("0640", 0o640),
            ("0o660", 0o660),
            ("0664", 0o664),
            ("0644", 0o644),
        ] {
            assert_eq!(parse_shm_mode(text), Ok(mode), "{text}");
        }
        for (text, why) in [
            ("0666", "world-writable"),
            ("0602", "world-writable"),
            ("0777", "execute"),
            ("0700", "execute"),
            ("0610", "execute"),
            ("4600", "setuid"),
            ("0400", "owner"),
            ("0060", "owner"),
            ("", "octal"),
            ("0680", "octal"),
            ("+660", "octal"),
            ("06600", "octal"),
            ("rw-", "octal"),
        ] {
            let err = parse_shm_mode(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
        let mut s = Settings::default();
        assert_eq!(s.shm_mode, 0o600);
        let err = s.set_shm_mode("0666").unwrap_err().to_string();
        assert!(
            err.contains("--shm-mode `0666`") && err.contains("0660"),
            "{err}"
        );
        assert_eq!(s.shm_mode, 0o600, "a refused mode changes nothing");
        s.set_shm_mode("0660").unwrap();
        assert_eq!(s.shm_mode, 0o660);
    }
    use super::*;

    #[test]
    fn budgets_from_flags_and_file() {
        let mut s = Settings::default();
        s.set_budget("cpu=64MiB").unwrap();
        assert_eq!(s.budget("cpu"), 64 << 20);
        assert!(s.set_budget("gpu=1GiB").is_err());
        assert!(s.set_budget("cpu").is_err());
        assert!(s.set_budget("cpu=lots").is_err());

        let dir = std::env::temp_dir().join(format!("memcoord-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "max_line_bytes = \"2MiB\"\n[budgets]\ncpu = \"8MiB\"\nshm = 1048576\n",
        )
        .unwrap();
        let s = Settings::from_file(&path).unwrap();
        assert_eq!(s.budget("cpu"), 8 << 20);
        assert_eq!(s.budget("shm"), 1 << 20);
        assert_eq!(s.max_line_bytes, 2 << 20);
        std::fs::write(&path, "[budgets]\nnope = 1\n").unwrap();
        assert!(Settings::from_file(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn limit(bytes: u64) -> Option<MemoryLimit> {
        Some(MemoryLimit {
            bytes,
            source: PathBuf::from("/sys/fs/cgroup/test/memory.max"),
        })
    }

    #[test]
    fn a_cgroup_limit_caps_defaults_and_refuses_budgets_above_it() {
        let mut s = Settings {
            memory_limit: limit(512 << 20),
            ..Settings::default()
        };
        // Defaults: half the capacity, the capacity being at most the limit.
        assert_eq!(s.budget("cpu"), (meminfo().total.min(512 << 20)) / 2);
        assert!(s.budget("shm") <= 256 << 20);
        if meminfo().total > 512 << 20 {
            assert!(s.limit_note().unwrap().contains("cpu"));
        }
        // Explicit budgets up to the limit are taken; above it refused, naming the limit and
        // the file it came from.
        s.set_budget("cpu=512MiB").unwrap();
        let e = s.set_budget("cpu=800MiB").unwrap_err().to_string();
        assert!(e.contains("512.00 MiB"), "{e}");
        assert!(e.contains("/sys/fs/cgroup/test/memory.max"), "{e}");
        assert!(e.contains("cgroup v2"), "{e}");
        assert_eq!(
            s.budget("cpu"),
            512 << 20,
            "a refused budget changes nothing"
        );
        assert!(s.set_budget("shm=1GiB").is_err());
        // GPUs are not charged to the cgroup.
        s.set_budget("cuda:0=40GiB").unwrap();
        // A budget put in the map directly is refused when the devices are made.
        s.budgets.insert("shm".into(), 1 << 30);
        assert!(s.host_devices().is_err());
        // No limit: anything goes.
        let mut s = Settings {
            memory_limit: None,
            ..Settings::default()
        };
        s.set_budget("cpu=1TiB").unwrap();
        assert_eq!(s.limit_note(), None);
    }

    #[test]
    fn defaults_are_half_the_machine() {
        let s = Settings::default();
        assert!(s.budget("cpu") > 0);
        assert!(s.budget("cpu") <= meminfo().total);
    }
}

//! The kinds the engine speaks of: memory types, allocation types, pressure levels, health,
//! model and transfer states, what an optimization or a recommendation does. Each has a
//! PascalCase name and an integer value (the same as the wire's: `protocol` writes
//! the name and reads the name or the integer), and nothing else here knows about the wire.

use std::fmt;

/// An allocation's id: a UUID v4 (written lowercase and hyphenated).
pub type AllocationId = uuid::Uuid;

/// A device's id as the contract names it: `cpu`, `shm`, `cuda:N`.
pub type DeviceId = String;

macro_rules! domain_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value),+
        }

        impl $name {
            /// Every value, in integer order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The PascalCase name (the one written on the wire).
            pub fn name(self) -> &'static str {
                match self { $($name::$variant => stringify!($variant)),+ }
            }

            /// The integer value (C#'s enum value).
            pub fn value(self) -> i64 {
                self as i64
            }

            /// Looks a value up by name, ignoring case.
            pub fn from_name(name: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.name().eq_ignore_ascii_case(name))
            }

            /// Looks a value up by its integer.
            pub fn from_value(value: i64) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.value() == value)
            }

            /// Every value as `Name (integer)`, comma-separated (for messages).
            pub fn choices() -> String {
                Self::ALL
                    .iter()
                    .map(|v| format!("{} ({})", v.name(), v.value()))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

domain_enum! {
    /// The kind of memory a device holds.
    MemoryType {
        /// Not known.
        Unknown = 0,
        /// Host RAM.
        RAM = 1,
        /// GPU memory.
        VRAM = 2,
        /// Host shared memory, mappable by other processes.
        SharedMemory = 3,
        /// Memory shared by host and device.
        UnifiedMemory = 4,
    }
}

domain_enum! {
    /// A device's health, from usage and fragmentation.
    MemoryHealthStatus {
        /// Not known.
        Unknown = 0,
        /// Nothing to do.
        Healthy = 1,
        /// Worth a look: high usage or fragmentation.
        Warning = 2,
        /// Act now.
        Critical = 3,
    }
}

domain_enum! {
    /// What an allocation is for.
    MemoryAllocationType {
        /// Anything.
        General = 0,
        /// Model weights.
        ModelWeights = 1,
        /// Activations.
        Activations = 2,
        /// A cache that `memory.optimize` may reclaim.
        Cache = 3,
        /// Staging buffers for transfers.
        Staging = 4,
        /// Short-lived data that `memory.optimize` may reclaim.
        Temporary = 5,
        /// Budget accounting only, no backing memory.
        Reservation = 6,
    }
}

domain_enum! {
    /// What `memory.optimize` does.
    MemoryOptimizationType {
        /// Release cached pages.
        ClearCache = 0,
        /// Compact allocations.
        Defragment = 1,
        /// Evict idle models.
        EvictIdleModels = 2,
        /// Reclaim until under a target usage.
        ReduceToTarget = 3,
        /// All of the above.
        Full = 4,
    }
}

domain_enum! {
    /// Where a transfer stands.
    TransferStatus {
        /// Waiting to start.
        Queued = 0,
        /// Copying.
        Running = 1,
        /// Done.
        Completed = 2,
        /// Failed; the source is intact.
        Failed = 3,
        /// Cancelled.
        Cancelled = 4,
    }
}

domain_enum! {
    /// How hard a device is pressed for memory.
    PressureLevel {
        /// No pressure.
        None = 0,
        /// Some.
        Low = 1,
        /// Noticeable.
        Moderate = 2,
        /// Requests are likely to wait.
        High = 3,
        /// Requests are failing.
        Critical = 4,
    }
}

domain_enum! {
    /// Where a model stands.
    ModelState {
        /// Being read onto its device.
        Loading = 0,
        /// On its home device.
        Loaded = 1,
        /// Its bytes are on `cpu`.
        Offloaded = 2,
        /// Being removed.
        Unloading = 3,
    }
}

domain_enum! {
    /// What a recommendation of `memory.optimization_recs` advises. The contract names these
    /// as strings only; the integers are this enum's order.
    RecommendationKind {
        /// Defragment the device: free memory is in pieces.
        Defragment = 0,
        /// Free Cache allocations and give back cached pages.
        ClearCache = 1,
        /// Free Cache and Temporary allocations down to a usage target.
        ReduceToTarget = 2,
        /// Move idle models' weights to `cpu`.
        OffloadIdleModels = 3,
        /// Unload idle models.
        UnloadIdleModels = 4,
        /// The budget is below what the device was asked for.
        RaiseBudget = 5,
        /// A persistent allocation has not been touched for a long time.
        ReviewPersistent = 6,
    }
}

/// How a transfer treats its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransferMode {
    /// The allocation keeps its id and changes device.
    Move,
    /// A new allocation on the destination; the source stays.
    Copy,
}

impl TransferMode {
    /// `move` or `copy`.
    pub fn name(self) -> &'static str {
        match self {
            TransferMode::Move => "move",
            TransferMode::Copy => "copy",
        }
    }
}

//! The REST routes, one per action: what `http` serves and `openapi` documents (a module of
//! their own so that neither imports the other).

/// One REST route: method, path (axum syntax), the action it carries out, and where its
/// path parameters go in `data` (they are named as the fields they fill).
#[derive(Debug, Clone, Copy)]
pub struct RestRoute {
    /// GET, POST or DELETE.
    pub method: &'static str,
    /// The path, `{name}` for a parameter (the field it fills).
    pub path: &'static str,
    /// The protocol action.
    pub action: &'static str,
    /// What it does, for people (docs, OpenAPI).
    pub summary: &'static str,
}

/// Every REST route, one per action of the contract.
pub const REST_ROUTES: &[RestRoute] = &[
    RestRoute {
        method: "GET",
        path: "/v1/devices",
        action: "memory.list_devices",
        summary: "Every device",
    },
    RestRoute {
        method: "GET",
        path: "/v1/devices/{device_id}/status",
        action: "memory.get_status",
        summary: "A device's figures, usage, allocations and fragmentation",
    },
    RestRoute {
        method: "GET",
        path: "/v1/devices/{device_id}/usage",
        action: "memory.get_usage",
        summary: "A device's counters",
    },
    RestRoute {
        method: "GET",
        path: "/v1/devices/{device_id}/allocations",
        action: "memory.get_allocations",
        summary: "A device's allocations, oldest first",
    },
    RestRoute {
        method: "POST",
        path: "/v1/allocations",
        action: "memory.allocate",
        summary: "Allocate memory (may wait for room)",
    },
    RestRoute {
        method: "DELETE",
        path: "/v1/allocations/{allocation_id}",
        action: "memory.deallocate",
        summary: "Free an allocation",
    },
    RestRoute {
        method: "POST",
        path: "/v1/devices/{device_id}/clear",
        action: "memory.clear",
        summary: "Free every client allocation of a device",
    },
    RestRoute {
        method: "POST",
        path: "/v1/devices/{device_id}/defragment",
        action: "memory.defragment",
        summary: "Compact a device's allocations",
    },
    RestRoute {
        method: "POST",
        path: "/v1/transfers",
        action: "memory.transfer",
        summary: "Move or copy an allocation to another device",
    },
    RestRoute {
        method: "GET",
        path: "/v1/transfers/{transfer_id}",
        action: "memory.get_transfer",
        summary: "A transfer's progress",
    },
    RestRoute {
        method: "POST",
        path: "/v1/devices/{device_id}/optimize",
        action: "memory.optimize",
        summary: "Free memory: ClearCache, Defragment, EvictIdleModels, ReduceToTarget, Full",
    },
    RestRoute {
        method: "POST",
        path: "/v1/models",
        action: "memory.model_load",
        summary: "Load a safetensors model onto a device",
    },
    RestRoute {
        method: "DELETE",
        path: "/v1/models/{model_name}",
        action: "memory.model_unload",
        summary: "Unload a model",
    },
    RestRoute {
        method: "POST",
        path: "/v1/models/{model_name}/acquire",
        action: "memory.model_acquire",
        summary: "Lease a model (brings an offloaded one back)",
    },
    RestRoute {
        method: "DELETE",
        path: "/v1/leases/{lease_id}",
        action: "memory.model_release",
        summary: "End a lease",
    },
    RestRoute {
        method: "GET",
        path: "/v1/models",
        action: "memory.model_status",
        summary: "Models, their state and bytes",
    },
    RestRoute {
        method: "POST",
        path: "/v1/models/optimize",
        action: "memory.model_optimize",
        summary: "Offload or unload idle models, or fit a budget",
    },
    RestRoute {
        method: "GET",
        path: "/v1/pressure",
        action: "memory.get_pressure",
        summary: "Memory pressure per device",
    },
    RestRoute {
        method: "GET",
        path: "/v1/analytics",
        action: "memory.analytics",
        summary: "History, size histogram, latency, purposes",
    },
    RestRoute {
        method: "GET",
        path: "/v1/recommendations",
        action: "memory.optimization_recs",
        summary: "Advice with the request that applies it",
    },
];

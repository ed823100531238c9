//! The export actions (the contract's section 8.3): `memory.export`, `memory.unexport`,
//! `memory.list_exports`, and the claim the claim socket (`transport::claim`) asks for. The
//! service keeps the table and the rules (what may be exported, what an export pins, when it
//! ends); the socket, its connections and the descriptors' passing are the transport's.
//!
//! `shm` and `cuda:N` memory is exported. For `shm` each descriptor is the shared-memory file
//! itself, so the file can stay 0600; for a GPU it is the physical allocation holding the
//! segment, as a POSIX file-descriptor handle (`backends::cuda`). `cpu` memory is private to
//! memcoord.

use super::MemoryService;
use super::requests::{ExportIdRequest, ExportRequest};
use crate::domain::{MemoryType, TensorView};
use crate::managers::exports::{ClaimRefused, Export};
use crate::protocol::{
    ClaimAnswer, ErrorCode, ExportInfo, ListExportsResponse, ProtocolError, Timestamp,
    UnexportResponse,
};
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

fn export_not_found(message: String) -> ProtocolError {
    ProtocolError::new(ErrorCode::ExportNotFound, message)
}

fn in_use(allocation: &Uuid, export: &Uuid) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::AllocationInUse,
        format!(
            "Allocation {allocation} is exported (export {export}): other processes may have it \
             mapped; end the export with memory.unexport first"
        ),
    )
}

impl MemoryService {
    /// Tells the service where its claim socket is (the transport that serves it calls this
    /// when it starts, and with `None` when it stops): `memory.export` answers with this path.
    pub fn set_claim_socket(&self, path: Option<PathBuf>) {
        *self.claim_socket.lock() = path;
    }

    /// Where claims are served, if anywhere.
    pub fn claim_socket(&self) -> Option<PathBuf> {
        self.claim_socket.lock().clone()
    }

    /// `memory.export`: an `shm` allocation, or a model resident on `shm` under one of its
    /// leases, laid out as page-aligned segments of the shared-memory file
    /// ([`plan_segments`](crate::domain::plan_segments)), with a secret good for one claim
    /// until `claim_seconds` from now.
    pub fn export(&self, req: &ExportRequest) -> Result<ExportInfo, ProtocolError> {
        let socket = self.claim_socket().ok_or_else(|| {
            ProtocolError::invalid_parameter(
                "exports are claimed through a socket the worker or server serves, and this \
                 service serves none (a library user starts transport::claim::ClaimServer)",
            )
        })?;
        let e = self.engine.lock();
        let (device, ids, model, lease, tensors) = match (&req.allocation_id, &req.model_name) {
            (Some(allocation_id), None) => {
                let view = e.allocation(allocation_id)?;
                if let Some(model) = view.owner.strip_prefix("model:") {
                    return Err(ProtocolError::invalid_parameter(format!(
                        "allocation {allocation_id} holds a tensor of model {model}: export the \
                         model with {{model_name, lease_id}} instead"
                    )));
                }
                let device = e.device_index(&view.device_id)?;
                (device, vec![view.allocation_id], None, None, Vec::new())
            }
            (None, Some(name)) => {
                let lease_id = req.lease_id.as_deref().unwrap_or_default();
                let lease_gone = || {
                    ProtocolError::new(
                        ErrorCode::LeaseNotFound,
                        format!("Lease {lease_id} not found on model {name}"),
                    )
                };
                let lease = Uuid::parse_str(lease_id).map_err(|_| lease_gone())?;
                let models = self.models.lock();
                let m = models.get(name).ok_or_else(|| {
                    ProtocolError::new(ErrorCode::ModelNotFound, format!("Model {name} not found"))
                })?;
                if models.lease_model(&lease) != Some(name.as_str()) {
                    return Err(lease_gone());
                }
                let device = e.device_index(&m.resident_device_id)?;
                let tensors = m.tensors.clone();
                (
                    device,
                    m.allocations.clone(),
                    Some(name.clone()),
                    Some(lease),
                    tensors,
                )
            }
            _ => {
                return Err(ProtocolError::invalid_parameter(
                    "give allocation_id, or model_name with lease_id",
                ));
            }
        };
        let device_id = e.device_id(device).to_string();
        let what = match &model {
            Some(name) => format!("model {name}, resident on {device_id},"),
            None => format!("allocation {}, on {device_id},", ids[0]),
        };
        if !matches!(
            e.memory_type(device),
            MemoryType::SharedMemory | MemoryType::VRAM
        ) {
            return Err(ProtocolError::invalid_parameter(format!(
                "{what} cannot be exported: {device_id} memory is private to memcoord; \
                 allocate on shm to share host memory"
            )));
        }
        let mut placed = Vec::with_capacity(ids.len());
        for id in &ids {
            if e.is_busy(id) {
                return Err(ProtocolError::new(
                    ErrorCode::AllocationInUse,
                    format!(
                        "allocation {id} is being transferred or having its pages backed; \
                         export it once that is done"
                    ),
                ));
            }
            let view = e
                .allocation_by_id(id)
                .ok_or_else(|| ProtocolError::invalid_parameter(format!("{id} is gone")))?;
            let offset = e.arena_offset(id).ok_or_else(|| {
                ProtocolError::invalid_parameter(format!(
                    "allocation {id} holds no memory to export (a Reservation)"
                ))
            })?;
            placed.push((*id, offset, view.size_bytes));
        }
        let crate::managers::allocations::Shared {
            segments: shared,
            allocations,
            size_bytes,
        } = e
            .share(device, &placed)
            .map_err(|err| {
                ProtocolError::new(
                    ErrorCode::InternalError,
                    format!("{what} could not be exported: {err}"),
                )
            })?
            .ok_or_else(|| {
                ProtocolError::invalid_parameter(format!(
                    "{what} cannot be exported: the GPU's driver cannot share its memory with \
                     other processes (no POSIX file-descriptor handles)"
                ))
            })?;
        let (segments, files): (Vec<_>, Vec<_>) = shared.into_iter().unzip();
        let device_uuid = e.device_uuid(device);
        let offset_of: rustc_hash::FxHashMap<Uuid, u64> = allocations
            .iter()
            .map(|a| (a.allocation_id, a.offset))
            .collect();
        let tensors: Vec<TensorView> = tensors
            .into_iter()
            .map(|t| TensorView {
                offset: t
                    .allocation
                    .and_then(|id| offset_of.get(&id).copied())
                    .unwrap_or(0),
                name: t.name,
                dtype: t.dtype,
                shape: t.shape,
                allocation_id: t.allocation,
                size_bytes: t.size_bytes,
            })
            .collect();
        let now = self.now();
        let export = Export {
            id: Uuid::new_v4(),
            secret: format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple()),
            device_id,
            size_bytes,
            segments,
            files,
            allocations,
            tensors,
            model,
            lease,
            claimed: false,
            created_at: now,
            expires_at: now + Duration::from_secs_f64(req.claim_seconds),
        };
        let info = ExportInfo {
            export_id: export.id.hyphenated().to_string(),
            device_id: export.device_id.clone(),
            device_uuid,
            size_bytes,
            socket_path: socket.to_string_lossy().into_owned(),
            secret: export.secret.clone(),
            expires_at: Timestamp(export.expires_at),
            allocations: export.allocations.iter().map(|&a| a.into()).collect(),
            tensors: export.tensors.iter().cloned().map(Into::into).collect(),
        };
        // Inserted with the engine held: nothing frees or moves these allocations between
        // the checks above and the pin.
        self.exports.lock().insert(export);
        drop(e);
        Ok(info)
    }

    /// `memory.unexport`: ends an export (its allocations may move and be freed again; an
    /// importer must unmap).
    pub fn unexport(&self, req: &ExportIdRequest) -> Result<UnexportResponse, ProtocolError> {
        let gone = || {
            export_not_found(format!(
                "Export {} not found: it ended, or never existed",
                req.export_id
            ))
        };
        let id = Uuid::parse_str(&req.export_id).map_err(|_| gone())?;
        let export = self.exports.lock().remove(&id).ok_or_else(gone)?;
        Ok(UnexportResponse {
            export_id: req.export_id.clone(),
            allocation_count: export.allocations.len() as u64,
        })
    }

    /// `memory.list_exports`: every live export, oldest first, without secrets.
    pub fn list_exports(&self) -> ListExportsResponse {
        ListExportsResponse {
            exports: self.exports.lock().all().map(|x| x.view().into()).collect(),
        }
    }

    /// A claim on the claim socket: with the right secret, not used yet and before
    /// `expires_at`, the answer's line and one file per segment (the transport passes their
    /// descriptors); the secret is then spent. Anything else is EXPORT_NOT_FOUND.
    pub fn claim(
        &self,
        export_id: &str,
        secret: &str,
    ) -> Result<(ClaimAnswer, Vec<Arc<File>>), ProtocolError> {
        let unknown = || {
            export_not_found(format!(
                "Export {export_id} not found: it ended, or never existed"
            ))
        };
        let id = Uuid::parse_str(export_id).map_err(|_| unknown())?;
        let claimed =
            self.exports
                .lock()
                .claim(&id, secret, self.now())
                .map_err(|why| match why {
                    ClaimRefused::Unknown => unknown(),
                    ClaimRefused::WrongSecret => {
                        export_not_found(format!("Export {export_id} not found for this secret"))
                    }
                    ClaimRefused::Claimed => export_not_found(format!(
                        "Export {export_id} was claimed already: a secret is good for one claim; \
                     export again for another process"
                    )),
                    ClaimRefused::Expired => export_not_found(format!(
                        "Export {export_id} can no longer be claimed: its claim time ran out; \
                     export again"
                    )),
                })?;
        Ok((
            ClaimAnswer {
                export_id: claimed.export_id.hyphenated().to_string(),
                device_id: claimed.device_id,
                size_bytes: claimed.size_bytes,
                segments: claimed.segments.into_iter().map(Into::into).collect(),
            },
            claimed.files,
        ))
    }

    /// Refuses to free or move an allocation an export holds (ALLOCATION_IN_USE naming it).
    pub(super) fn check_not_exported(&self, allocation_id: &str) -> Result<(), ProtocolError> {
        let Ok(id) = Uuid::parse_str(allocation_id) else {
            return Ok(());
        };
        match self.exports.lock().holding(&id) {
            Some(x) => Err(in_use(&id, &x.id)),
            None => Ok(()),
        }
    }

    /// Every allocation an export holds: defragment and optimize leave them where they are.
    pub(super) fn exported_allocations(&self) -> Vec<Uuid> {
        self.exports.lock().fixed_allocations()
    }

    /// Ends the exports made under a lease (the lease ended); returns how many.
    pub(super) fn end_exports_of_lease(&self, lease: &Uuid) -> usize {
        let gone = self
            .exports
            .lock()
            .remove_where(|x| x.lease.as_ref() == Some(lease));
        gone.len()
    }

    /// Ends the exports of a model (it is unloaded with force); returns how many.
    pub(super) fn end_exports_of_model(&self, name: &str) -> usize {
        let gone = self
            .exports
            .lock()
            .remove_where(|x| x.model.as_deref() == Some(name));
        gone.len()
    }

    /// Ends the exports holding any of `allocations` (they are about to be freed).
    pub(super) fn end_exports_holding(&self, allocations: &[Uuid]) -> usize {
        let gone = self.exports.lock().remove_where(|x| {
            x.allocations
                .iter()
                .any(|a| allocations.contains(&a.allocation_id))
        });
        gone.len()
    }

    /// Ends every export (shutdown).
    pub(super) fn end_all_exports(&self) {
        self.exports.lock().remove_where(|_| true);
    }
}

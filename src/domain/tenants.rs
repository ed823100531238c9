//! Tenants (the contract's section 8.2): who a token belongs to, and each tenant's quota per
//! device. Read once at start-up (the config file's `[tenants.NAME]` tables); immutable after.

use super::caller::{Caller, DEFAULT_TENANT};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The tenant of the operator's token (`--token-file`) when tenants are declared: no quota,
/// sees and may release everything.
pub const ADMIN_TENANT: &str = "admin";

/// One declared tenant.
#[derive(Debug, Clone, Default)]
pub struct TenantSpec {
    /// Its token (read from its token file, trimmed).
    pub token: Option<String>,
    /// Its quota in bytes per device id; a device not named has no quota.
    pub quota: BTreeMap<String, u64>,
}

/// Every declared tenant, and the callers that stand for them over HTTP.
#[derive(Debug, Default)]
pub struct Tenants {
    specs: BTreeMap<Arc<str>, TenantSpec>,
    /// (token, tenant), the operator's token included.
    tokens: Vec<(String, Arc<str>)>,
    /// One caller per tenant (no session, no process), shared by its HTTP requests.
    callers: BTreeMap<Arc<str>, Arc<Caller>>,
}

impl Tenants {
    /// Tenants as declared (`specs`, by name), with the operator's token (tenant `admin`), if
    /// any. `Err` says, for people, why they cannot be used: a reserved name, a token used twice.
    pub fn new(
        specs: BTreeMap<String, TenantSpec>,
        operator_token: Option<&str>,
    ) -> Result<Tenants, String> {
        let mut t = Tenants::default();
        if specs.is_empty() {
            return Ok(t);
        }
        if specs.contains_key(ADMIN_TENANT) {
            return Err(format!(
                "[tenants.{ADMIN_TENANT}]: `{ADMIN_TENANT}` is the operator (the token of \
                 --token-file); give the tenant another name"
            ));
        }
        for (name, spec) in specs {
            let name: Arc<str> = Arc::from(name.as_str());
            if let Some(token) = &spec.token {
                t.add_token(token, &name)?;
            }
            t.specs.insert(name, spec);
        }
        if let Some(token) = operator_token {
            t.add_token(token, &Arc::from(ADMIN_TENANT))?;
        }
        for name in t
            .specs
            .keys()
            .cloned()
            .chain([Arc::from(ADMIN_TENANT), Arc::from(DEFAULT_TENANT)])
        {
            let caller = Arc::new(Caller {
                session: None,
                client_pid: None,
                tenant: Arc::clone(&name),
            });
            t.callers.insert(name, caller);
        }
        Ok(t)
    }

    fn add_token(&mut self, token: &str, name: &Arc<str>) -> Result<(), String> {
        if let Some((_, other)) = self.tokens.iter().find(|(t, _)| t == token) {
            return Err(format!(
                "tenants `{other}` and `{name}` have the same token: give each tenant its own \
                 token file with a different token"
            ));
        }
        self.tokens.push((token.to_string(), Arc::clone(name)));
        Ok(())
    }

    /// Whether any tenant is declared (without, every request is `default` and sees all).
    pub fn declared(&self) -> bool {
        !self.specs.is_empty()
    }

    /// The tenant whose token `token` is (compared in constant time against each).
    pub fn by_token(&self, token: &str) -> Option<Arc<str>> {
        use subtle::ConstantTimeEq;
        let mut found = None;
        for (t, name) in &self.tokens {
            let same = t.len() == token.len() && bool::from(t.as_bytes().ct_eq(token.as_bytes()));
            if same {
                found = Some(Arc::clone(name));
            }
        }
        found
    }

    /// The caller (no session) of the tenant `name`, shared.
    pub fn caller(&self, name: &str) -> Arc<Caller> {
        self.callers
            .get(name)
            .cloned()
            .unwrap_or_else(Caller::anonymous)
    }

    /// The quota of `tenant` on `device`, if it has one.
    pub fn quota(&self, tenant: &str, device: &str) -> Option<u64> {
        self.specs.get(tenant)?.quota.get(device).copied()
    }

    /// Whether any tenant has a quota (nothing to check otherwise).
    pub fn has_quotas(&self) -> bool {
        self.specs.values().any(|s| !s.quota.is_empty())
    }

    /// The declared tenants' names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.specs.keys().map(|k| &**k)
    }
}

/// Whether a request of `viewer` may see and act on what `owner` holds: its own, or the
/// operator's (`admin`) everything.
pub fn may_see(viewer: &str, owner: &str) -> bool {
    viewer == owner || viewer == ADMIN_TENANT
}

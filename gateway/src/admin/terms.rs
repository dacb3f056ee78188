//! A tenant's terms (its plan and `metadata.limits`) kept agreeing across its consumers.
//!
//! In: a consumer's metadata as a create or patch left it, and which term fields the request
//! named. Out: the metadata to write (each term field the request did not name is the
//! tenant's current one), and after the write, the tenant's other consumers rewritten with
//! the written consumer's terms.
//!
//! Why: limits are counted per tenant, so two consumers of one tenant on different plans
//! would share a counter but each be checked against its own allowance. Naming a plan on any
//! consumer sets it for the tenant. The gateway does not depend on the rewrite having
//! finished: it limits every key of a tenant by the tenant's most recently updated consumer
//! (`crate::directory::Directory::terms_of`), which the first write already is; and since
//! every consumer write rewrites the tenant's disagreeing consumers, a rewrite a failed write
//! cut short is finished by the next write to any consumer of the tenant.

use serde_json::{Map, Value};
use tollgate_schemas::{encode, EntityKey};

use super::{now_ms, Admin};
use crate::problem::Problem;

/// The metadata fields that are the tenant's, not the consumer's.
fn term_fields(admin: &Admin) -> [&str; 2] {
    [admin.identity.plan_field.as_str(), "limits"]
}

impl Admin {
    /// The term fields a request's metadata (a create body, or a patch, where `null` removes)
    /// names.
    pub(super) fn named_terms(&self, metadata: &Map<String, Value>) -> Vec<String> {
        term_fields(self)
            .into_iter()
            .filter(|field| metadata.contains_key(*field))
            .map(str::to_owned)
            .collect()
    }

    /// Sets each term field the request did not name to the current value of the tenant that
    /// `metadata` names (its ruling consumer's, which may be the one being written). A plan
    /// these settings no longer define is not carried over, nor are the overrides checked
    /// against it: the consumer then takes the default plan, as the gateway already applies.
    /// A metadata without a valid tenant, or naming a tenant with no consumers yet, is left
    /// alone.
    pub(super) fn inherit_terms(&self, metadata: &mut Map<String, Value>, named: &[String]) {
        let Some(Value::String(tenant)) = metadata.get(&self.identity.tenant_field) else {
            return;
        };
        let Some(ruling) = self.store.directory().read().expect("directory lock").terms_of(tenant) else {
            return;
        };
        let mut current = ruling.metadata.clone();
        if ruling.plan.as_ref().is_some_and(|plan| !self.plans.contains_key(plan)) {
            current.remove(&self.identity.plan_field);
            current.remove("limits");
        }
        for field in term_fields(self) {
            if named.iter().any(|n| n == field) {
                continue;
            }
            match current.get(field) {
                Some(value) => metadata.insert(field.to_owned(), value.clone()),
                None => metadata.remove(field),
            };
        }
    }

    /// The plan `tenant` is limited and priced by: its ruling consumer's when defined here,
    /// else the default plan.
    pub(super) fn tenant_plan(&self, tenant: &str) -> Option<String> {
        self.store
            .directory()
            .read()
            .expect("directory lock")
            .terms_of(tenant)
            .and_then(|ruling| ruling.plan.clone())
            .filter(|plan| self.plans.contains_key(plan))
            .or_else(|| self.identity.default_plan.clone())
    }

    /// Rewrites every other consumer of `tenant` whose terms differ from `source`'s. Returns
    /// the names rewritten. A failed write leaves the rest for a retry of the same request,
    /// which rewrites them again.
    pub(super) async fn spread_terms(
        &self,
        source: &Map<String, Value>,
        tenant: &str,
        id: &str,
    ) -> Result<Vec<String>, Problem> {
        let fields = term_fields(self);
        let siblings = self
            .store
            .directory()
            .read()
            .expect("directory lock")
            .consumers_of(tenant);
        let mut rewritten = Vec::new();
        for sibling in siblings.into_iter().filter(|c| c.id != id) {
            if fields.iter().all(|f| sibling.metadata.get(*f) == source.get(*f)) {
                continue;
            }
            let mut metadata = sibling.metadata.clone();
            copy_terms(fields, source, &mut metadata);
            let record = self.consumer_record(
                sibling.id.clone(),
                &sibling.name,
                metadata,
                sibling.created_at_ms,
                now_ms(),
                sibling.version + 1,
            )?;
            self.write(&EntityKey::Consumer(&record.id).to_string(), Some(encode(&record)))
                .await?;
            rewritten.push(sibling.name.clone());
        }
        Ok(rewritten)
    }
}

/// Makes `to` carry exactly `from`'s values of `fields` (absent in `from`: removed).
fn copy_terms(fields: [&str; 2], from: &Map<String, Value>, to: &mut Map<String, Value>) {
    for field in fields {
        match from.get(field) {
            Some(value) => to.insert(field.to_owned(), value.clone()),
            None => to.remove(field),
        };
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn copied_terms_replace_and_remove_exactly_the_term_fields() {
        let from = json!({"plan": "pro", "tenantId": "t1"});
        let mut to = json!({"plan": "free", "limits": {"requests_per_minute": 5}, "tenantId": "t1", "team": "x"});
        copy_terms(
            ["plan", "limits"],
            from.as_object().unwrap(),
            to.as_object_mut().unwrap(),
        );
        assert_eq!(to, json!({"plan": "pro", "tenantId": "t1", "team": "x"}));
    }
}

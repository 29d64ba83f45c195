//! Which workspace a Stripe object belongs to: metadata first, then the customer link
//! written by the first checkout. A customer is linked once and never moved.

use super::objects;
use super::records::*;
use super::{BillingEvents, poison};
use crate::ids::{CustomerId, WorkspaceId};
use crate::queue::ConsumeError;
use crate::store::StoreError;
use crate::store::docs::{self, DocStore};
use std::collections::HashMap;

impl BillingEvents {
    /// Links a Stripe customer to a workspace (first link wins; a conflicting one is
    /// refused loudly and left alone).
    pub(super) async fn link_customer(
        &self,
        customer: &CustomerId,
        workspace: &WorkspaceId,
    ) -> Result<(), ConsumeError> {
        link_customer(self.docs.as_ref(), customer, workspace).await?;
        Ok(())
    }

    pub(super) async fn customer_workspace(
        &self,
        customer: Option<&CustomerId>,
    ) -> Result<Option<WorkspaceId>, ConsumeError> {
        let Some(c) = customer else { return Ok(None) };
        Ok(
            docs::get::<Link>(self.docs.as_ref(), &customer_pk(c), LINK_SK)
                .await?
                .map(|l| l.workspace),
        )
    }

    pub(super) fn metadata_workspace(
        meta: &HashMap<String, String>,
    ) -> Result<Option<WorkspaceId>, ConsumeError> {
        meta.get("org_id")
            .map(|o| WorkspaceId::parse(o).map_err(|e| poison(format!("metadata org_id: {e}"))))
            .transpose()
    }

    pub(super) async fn invoice_workspace(
        &self,
        invoice: &objects::Invoice,
    ) -> Result<WorkspaceId, ConsumeError> {
        if let Some(a) = Self::metadata_workspace(&invoice.metadata)? {
            return Ok(a);
        }
        if let Some(d) = invoice.subscription_details()
            && let Some(a) = Self::metadata_workspace(&d.metadata)?
        {
            return Ok(a);
        }
        self.customer_workspace(invoice.customer.id())
            .await?
            .ok_or_else(|| {
                ConsumeError::retry(format!("no workspace known for invoice {}", invoice.id))
            })
    }
}

/// Links a Stripe customer to a workspace and records it on the workspace's billing
/// profile. The first link wins; a conflicting later claim is refused loudly and left
/// alone. Returns the customer the profile names afterwards.
pub async fn link_customer(
    docs_store: &dyn DocStore,
    customer: &CustomerId,
    workspace: &WorkspaceId,
) -> Result<CustomerId, StoreError> {
    let linked = docs::update(
        docs_store,
        &customer_pk(customer),
        LINK_SK,
        |cur: Option<Link>| {
            cur.is_none().then(|| Link {
                workspace: workspace.clone(),
            })
        },
    )
    .await?;
    if let Some(l) = linked
        && &l.workspace != workspace
    {
        tracing::error!(customer = %customer, linked = %l.workspace, claimed = %workspace,
            "Stripe customer already belongs to another workspace; ignoring the new claim");
    }
    let profile = docs::update(
        docs_store,
        &workspace_pk(workspace),
        PROFILE_SK,
        |cur: Option<BillingProfile>| {
            let mut p = cur.unwrap_or_default();
            if p.customer.is_some() {
                return None;
            }
            p.customer = Some(customer.clone());
            Some(p)
        },
    )
    .await?;
    Ok(profile
        .and_then(|p| p.customer)
        .unwrap_or_else(|| customer.clone()))
}

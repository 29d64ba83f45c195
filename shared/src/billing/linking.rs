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
    /// Links a Stripe customer to a workspace (first link wins). An event naming a
    /// customer linked to another workspace is not applied: it goes to the dead letters,
    /// so nothing of one workspace's customer reaches another's.
    pub(super) async fn link_customer(
        &self,
        customer: &CustomerId,
        workspace: &WorkspaceId,
    ) -> Result<(), ConsumeError> {
        match link_customer(self.docs.as_ref(), customer, workspace).await? {
            Linked::Ours(_) => Ok(()),
            Linked::Elsewhere(owner) => Err(poison(format!(
                "Stripe customer {customer} belongs to workspace {owner}, not {workspace} as \
                 the object's metadata says: not applied; grant or adjust by hand if it paid \
                 for something, after fixing the metadata in Stripe"
            ))),
        }
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

    /// The workspace an object's metadata names, unless its Stripe customer belongs to
    /// another workspace: then the object (metadata edited in the dashboard) goes to the
    /// dead letters rather than filing one workspace's invoice, payment or card under
    /// another, or granting its credits there.
    pub(super) async fn named_workspace(
        &self,
        named: WorkspaceId,
        customer: Option<&CustomerId>,
        object: &str,
    ) -> Result<WorkspaceId, ConsumeError> {
        match self.customer_workspace(customer).await? {
            Some(owner) if owner != named => Err(poison(format!(
                "{object} names workspace {named}, but its Stripe customer belongs to {owner}: \
                 not applied; grant or adjust by hand if it paid for something, after fixing \
                 the metadata in Stripe"
            ))),
            _ => Ok(named),
        }
    }

    pub(super) async fn invoice_workspace(
        &self,
        invoice: &objects::Invoice,
    ) -> Result<WorkspaceId, ConsumeError> {
        let named = match Self::metadata_workspace(&invoice.metadata)? {
            Some(a) => Some(a),
            None => match invoice.subscription_details() {
                Some(d) => Self::metadata_workspace(&d.metadata)?,
                None => None,
            },
        };
        if let Some(a) = named {
            return self
                .named_workspace(a, invoice.customer.id(), &format!("invoice {}", invoice.id))
                .await;
        }
        self.customer_workspace(invoice.customer.id())
            .await?
            .ok_or_else(|| {
                ConsumeError::retry(format!("no workspace known for invoice {}", invoice.id))
            })
    }
}

/// What [`link_customer`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Linked {
    /// The customer the workspace's billing profile names afterwards.
    Ours(CustomerId),
    /// The customer belongs to this other workspace: nothing was written.
    Elsewhere(WorkspaceId),
}

/// Links a Stripe customer to a workspace and records it on the workspace's billing
/// profile. The first link wins: a customer linked to another workspace is refused
/// loudly and written nowhere, so the claiming workspace never reaches it (its portal,
/// invoices, card or subscription).
pub async fn link_customer(
    docs_store: &dyn DocStore,
    customer: &CustomerId,
    workspace: &WorkspaceId,
) -> Result<Linked, StoreError> {
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
        return Ok(Linked::Elsewhere(l.workspace));
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
    Ok(Linked::Ours(
        profile
            .and_then(|p| p.customer)
            .unwrap_or_else(|| customer.clone()),
    ))
}

//! Who is calling. In AWS, API Gateway's JWT authorizer has already verified the token and
//! the claims arrive in the request context; locally, HS256 dev tokens signed with
//! `TALLY_DEV_JWT_SECRET` are verified here and yield the same claims. Handlers only ever
//! see an [`Identity`]. Dev tokens are behind the `local` feature: a Lambda binary has no
//! way to accept a token API Gateway did not verify.

use super::problem::Problem;
use crate::ids::WorkspaceId;
use crate::ledger::{Actor, ActorKind};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
#[cfg(feature = "local")]
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
#[cfg(feature = "local")]
use hmac::{Hmac, Mac};
#[cfg(feature = "local")]
use sha2::Sha256;
use std::collections::HashMap;
#[cfg(feature = "local")]
use std::sync::Arc;

/// Scope of the generation service: may settle any generation.
pub const SCOPE_SETTLE: &str = "credits:settle";
/// Scope of support staff: adjustments and other admin actions on any workspace.
pub const SCOPE_ADMIN: &str = "credits:admin";
/// Scopes of callers who act for Tally rather than for a workspace.
pub const STAFF_SCOPES: [&str; 2] = [SCOPE_SETTLE, SCOPE_ADMIN];
/// Default local signing secret for dev tokens.
#[cfg(feature = "local")]
pub const DEFAULT_DEV_SECRET: &str = "tally-dev-secret";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Owner,
    BillingAdmin,
    Member,
}

impl Role {
    fn parse(v: &str) -> Option<Role> {
        match v {
            "owner" => Some(Role::Owner),
            "billing_admin" => Some(Role::BillingAdmin),
            "member" => Some(Role::Member),
            _ => None,
        }
    }
}

/// The verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub sub: String,
    pub email: Option<String>,
    pub workspace: Option<WorkspaceId>,
    pub role: Option<Role>,
    pub scopes: Vec<String>,
}

impl Identity {
    /// Reads the claims the studio's identity provider issues.
    pub fn from_claims(claims: &HashMap<String, String>) -> Result<Self, Problem> {
        let sub = claims
            .get("sub")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Problem::unauthorized("token has no subject"))?
            .clone();
        let workspace = match claims.get("org_id").filter(|s| !s.is_empty()) {
            Some(org) => Some(
                WorkspaceId::parse(org)
                    .map_err(|e| Problem::unauthorized(format!("token org_id: {e}")))?,
            ),
            None => None,
        };
        let role = match claims.get("role").filter(|s| !s.is_empty()) {
            Some(r) => Some(
                Role::parse(r).ok_or_else(|| Problem::forbidden(format!("unknown role {r:?}")))?,
            ),
            None => None,
        };
        let scopes: Vec<String> = claims
            .get("scope")
            .map(|s| {
                s.trim_matches(|c| c == '[' || c == ']')
                    .split([' ', ','])
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        // A workspace member acts for the workspace, staff and services for Tally: one
        // token is never both, or the journal would record staff actions as the member's.
        if role.is_some() && scopes.iter().any(|s| STAFF_SCOPES.contains(&s.as_str())) {
            return Err(Problem::forbidden(
                "a token carries either a workspace role or a staff scope, not both",
            ));
        }
        Ok(Self {
            sub,
            email: claims.get("email").cloned(),
            workspace,
            role,
            scopes,
        })
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// The caller's own workspace; members of a workspace must carry both org and role.
    pub fn member_workspace(&self) -> Result<&WorkspaceId, Problem> {
        match (&self.workspace, self.role) {
            (Some(ws), Some(_)) => Ok(ws),
            _ => Err(Problem::forbidden(
                "this route needs a workspace member token (org_id and role claims)",
            )),
        }
    }

    pub fn require_scope(&self, scope: &str) -> Result<(), Problem> {
        if self.has_scope(scope) {
            Ok(())
        } else {
            Err(Problem::forbidden(format!(
                "this route needs the {scope} scope"
            )))
        }
    }

    /// Owners and billing admins may buy, change plans and request refunds.
    pub fn can_manage_billing(&self) -> bool {
        matches!(self.role, Some(Role::Owner | Role::BillingAdmin))
    }

    /// How this caller appears in the journal.
    pub fn actor(&self) -> Actor {
        let kind = if self.role.is_some() {
            ActorKind::Member
        } else if self.has_scope(SCOPE_ADMIN) {
            ActorKind::Admin
        } else {
            ActorKind::Service
        };
        Actor::new(kind, self.sub.clone())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Identity {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Identity>()
            .cloned()
            .ok_or_else(|| Problem::unauthorized("missing or invalid credentials"))
    }
}

/// A member of a workspace (org and role claims), read before the body: who may call a
/// route is decided before what they sent is looked at.
#[derive(Debug, Clone)]
pub struct WorkspaceMember {
    pub who: Identity,
    pub workspace: WorkspaceId,
}

impl<S: Send + Sync> FromRequestParts<S> for WorkspaceMember {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let who = Identity::from_request_parts(parts, state).await?;
        let workspace = who.member_workspace()?.clone();
        Ok(Self { who, workspace })
    }
}

/// Support staff (scope `credits:admin`), read before the body.
#[derive(Debug, Clone)]
pub struct Staff(pub Identity);

impl<S: Send + Sync> FromRequestParts<S> for Staff {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let who = Identity::from_request_parts(parts, state).await?;
        who.require_scope(SCOPE_ADMIN)?;
        Ok(Self(who))
    }
}

/// The generation service (scope `credits:settle`), read before the body. It alone knows
/// whether a generation succeeded and what it cost.
#[derive(Debug, Clone)]
pub struct Settler(pub Identity);

impl<S: Send + Sync> FromRequestParts<S> for Settler {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let who = Identity::from_request_parts(parts, state).await?;
        if !who.has_scope(SCOPE_SETTLE) {
            return Err(Problem::forbidden(
                "only the generation service (scope credits:settle) settles generations",
            ));
        }
        Ok(Self(who))
    }
}

/// Support staff (scope `credits:admin`) or the generation service (scope
/// `credits:settle`), read before the body.
#[derive(Debug, Clone)]
pub struct StaffOrSettler(pub Identity);

impl<S: Send + Sync> FromRequestParts<S> for StaffOrSettler {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let who = Identity::from_request_parts(parts, state).await?;
        if !who.has_scope(SCOPE_ADMIN) && !who.has_scope(SCOPE_SETTLE) {
            return Err(Problem::forbidden(
                "only support staff (credits:admin) or the generation service (credits:settle) may do this",
            ));
        }
        Ok(Self(who))
    }
}

/// Support staff (scope `credits:admin`) or a member of a workspace, read before the
/// body.
#[derive(Debug, Clone)]
pub struct StaffOrMember(pub Identity);

impl<S: Send + Sync> FromRequestParts<S> for StaffOrMember {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let who = Identity::from_request_parts(parts, state).await?;
        if !who.has_scope(SCOPE_ADMIN) {
            who.member_workspace()?;
        }
        Ok(Self(who))
    }
}

/// The owner or a billing admin of a workspace, read before the body: a member learns
/// only that they may not, whatever they sent.
#[derive(Debug, Clone)]
pub struct BillingManager {
    pub who: Identity,
    pub workspace: WorkspaceId,
}

impl<S: Send + Sync> FromRequestParts<S> for BillingManager {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let who = Identity::from_request_parts(parts, state).await?;
        let workspace = billing_workspace(&who)?;
        Ok(Self { who, workspace })
    }
}

/// The workspace whose billing (purchases, refunds) `who` manages: owners and billing
/// admins; members are refused.
pub fn billing_workspace(who: &Identity) -> Result<WorkspaceId, Problem> {
    let workspace = who.member_workspace()?.clone();
    if !who.can_manage_billing() {
        return Err(Problem::forbidden(
            "only the workspace owner or a billing admin can manage billing and refunds",
        ));
    }
    Ok(workspace)
}

/// Where identities come from.
#[derive(Clone)]
pub enum AuthMode {
    /// Claims verified by API Gateway's JWT authorizer, read from the request context.
    ApiGateway,
    /// HS256 bearer tokens verified in process (local runner and tests).
    #[cfg(feature = "local")]
    DevToken { secret: Arc<Vec<u8>> },
}

#[cfg(feature = "local")]
impl AuthMode {
    pub fn dev(secret: &str) -> Self {
        AuthMode::DevToken {
            secret: Arc::new(secret.as_bytes().to_vec()),
        }
    }
}

/// Middleware that turns credentials into an [`Identity`] extension or answers 401.
pub async fn authenticate(State(mode): State<AuthMode>, mut req: Request, next: Next) -> Response {
    let claims = match &mode {
        AuthMode::ApiGateway => api_gateway_claims(&req),
        #[cfg(feature = "local")]
        AuthMode::DevToken { secret } => {
            bearer(&req).and_then(|t| verify_dev_token(t, secret, chrono::Utc::now().timestamp()))
        }
    };
    match claims.and_then(|c| Identity::from_claims(&c)) {
        Ok(identity) => {
            req.extensions_mut().insert(identity);
            next.run(req).await
        }
        Err(p) => p.into_response(),
    }
}

fn api_gateway_claims(req: &Request) -> Result<HashMap<String, String>, Problem> {
    use lambda_http::request::RequestContext;
    match req.extensions().get::<RequestContext>() {
        Some(RequestContext::ApiGatewayV2(ctx)) => {
            let jwt = ctx
                .authorizer
                .as_ref()
                .and_then(|a| a.jwt.as_ref())
                .ok_or_else(|| Problem::unauthorized("no JWT authorizer claims on the request"))?;
            let mut claims = jwt.claims.clone();
            if let Some(scopes) = &jwt.scopes
                && !claims.contains_key("scope")
            {
                claims.insert("scope".into(), scopes.join(" "));
            }
            Ok(claims)
        }
        _ => Err(Problem::unauthorized("no API Gateway request context")),
    }
}

#[cfg(feature = "local")]
fn bearer(req: &Request) -> Result<&str, Problem> {
    req.headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| Problem::unauthorized("send Authorization: Bearer <token>"))
}

#[cfg(feature = "local")]
type HmacSha256 = Hmac<Sha256>;

/// Signs a dev token (HS256) over the given claims.
#[cfg(feature = "local")]
pub fn dev_token(secret: &[u8], claims: &serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{payload}");
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(signing_input.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{sig}")
}

/// Verifies an HS256 dev token (signature in constant time, `exp` required, `nbf` honoured)
/// and returns its claims as strings, the way API Gateway presents them.
#[cfg(feature = "local")]
pub fn verify_dev_token(
    token: &str,
    secret: &[u8],
    now: i64,
) -> Result<HashMap<String, String>, Problem> {
    let bad = |why: &str| Problem::unauthorized(format!("invalid token: {why}"));
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("not a JWT"));
    };
    let header: serde_json::Value = URL_SAFE_NO_PAD
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| bad("unreadable header"))?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
        return Err(bad("only HS256 is accepted"));
    }
    let sig = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| bad("unreadable signature"))?;
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(format!("{h}.{p}").as_bytes());
    mac.verify_slice(&sig)
        .map_err(|_| bad("signature mismatch"))?;
    let claims: serde_json::Map<String, serde_json::Value> = URL_SAFE_NO_PAD
        .decode(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| bad("unreadable claims"))?;
    let exp = claims
        .get("exp")
        .and_then(|e| e.as_i64())
        .ok_or_else(|| bad("no exp claim"))?;
    if exp <= now {
        return Err(bad("expired"));
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = nbf.as_i64().ok_or_else(|| bad("nbf is not a number"))?;
        if nbf > now {
            return Err(bad("not valid yet (nbf)"));
        }
    }
    Ok(claims
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s,
                serde_json::Value::Array(items) => items
                    .iter()
                    .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                    .collect::<Vec<_>>()
                    .join(" "),
                other => other.to_string(),
            };
            (k, text)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(feature = "local")]
    use serde_json::json;

    #[cfg(feature = "local")]
    const NOW: i64 = 1_800_000_000;

    #[cfg(feature = "local")]
    fn claims() -> serde_json::Value {
        json!({"sub": "u1", "org_id": "org_a", "role": "member", "scope": "a b", "exp": NOW + 60})
    }

    #[cfg(feature = "local")]
    #[test]
    fn a_dev_token_round_trips_into_the_same_claims_api_gateway_would_give() {
        let t = dev_token(b"s3cret", &claims());
        let c = verify_dev_token(&t, b"s3cret", NOW).unwrap();
        let id = Identity::from_claims(&c).unwrap();
        assert_eq!(id.sub, "u1");
        assert_eq!(id.workspace.unwrap().as_str(), "org_a");
        assert_eq!(id.role, Some(Role::Member));
        assert_eq!(id.scopes, vec!["a", "b"]);
    }

    #[cfg(feature = "local")]
    #[test]
    fn tokens_with_a_wrong_key_tampered_claims_or_past_expiry_are_refused() {
        let t = dev_token(b"s3cret", &claims());
        assert!(verify_dev_token(&t, b"other", NOW).is_err());
        let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
        let mut forged = claims();
        forged["org_id"] = "org_b".into();
        parts[1] = URL_SAFE_NO_PAD.encode(forged.to_string());
        assert!(verify_dev_token(&parts.join("."), b"s3cret", NOW).is_err());
        assert!(verify_dev_token(&t, b"s3cret", NOW + 61).is_err());
        let mut no_exp = claims();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert!(verify_dev_token(&dev_token(b"s3cret", &no_exp), b"s3cret", NOW).is_err());
    }

    #[cfg(feature = "local")]
    #[test]
    fn unsigned_tokens_are_refused() {
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        let p = URL_SAFE_NO_PAD.encode(claims().to_string());
        assert!(verify_dev_token(&format!("{h}.{p}."), b"s3cret", NOW).is_err());
    }

    #[test]
    fn unknown_roles_are_forbidden() {
        let mut c = HashMap::new();
        c.insert("sub".to_string(), "u".to_string());
        c.insert("role".to_string(), "superuser".to_string());
        assert_eq!(Identity::from_claims(&c).unwrap_err().code, "forbidden");
    }
}

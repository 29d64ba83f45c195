//! Validated identifiers, parsed once at the boundary so the rest of the code can trust them.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// Why an identifier was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdError {
    #[error("{kind} must not be empty")]
    Empty { kind: &'static str },
    #[error("{kind} is longer than {max} characters")]
    TooLong { kind: &'static str, max: usize },
    #[error("{kind} may only contain letters, digits, '-', '_', '.' and ':'")]
    BadCharacter { kind: &'static str },
    #[error("{kind} is not a valid id: {reason}")]
    Malformed { kind: &'static str, reason: String },
}

fn check_token(kind: &'static str, value: &str, max: usize) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > max {
        return Err(IdError::TooLong { kind, max });
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err(IdError::BadCharacter { kind });
    }
    Ok(())
}

/// A workspace (the `org_id` claim). Every balance, lot and generation belongs to exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WorkspaceId(String);

impl WorkspaceId {
    /// The rule [`WorkspaceId::parse`] applies, as a JSON Schema pattern.
    pub const PATTERN: &'static str = "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$";

    /// Letters, digits, `-`, `_`, `.` and `:`, at most 128, starting with a letter or digit:
    /// an id also names a path segment and a key prefix, so `.`, `..` and other
    /// punctuation-only ids are refused.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        check_token("workspace id", value, 128)?;
        if !value.as_bytes()[0].is_ascii_alphanumeric() {
            return Err(IdError::Malformed {
                kind: "workspace id",
                reason: "must start with a letter or digit".into(),
            });
        }
        Ok(Self(value.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for WorkspaceId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}
impl From<WorkspaceId> for String {
    fn from(value: WorkspaceId) -> Self {
        value.0
    }
}
impl fmt::Display for WorkspaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A generation (one run of a model), `gen_` followed by a ULID so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GenerationId(ulid::Ulid);

impl GenerationId {
    pub const PREFIX: &'static str = "gen_";

    /// A new id made now by the wall clock (see [`GenerationId::at`]).
    pub fn new() -> Self {
        Self::at(chrono::Utc::now())
    }

    /// A new id made at `now`, the system's one clock: its time is when the generation
    /// started, so a range of creation times is a range of ids (a generation's `created_at`
    /// is never earlier than its id's time). Ids made by one process at the same
    /// millisecond increase in the order they are made, so the creation history lists them
    /// in that order, whatever other instants ids are made at meanwhile.
    pub fn at(now: chrono::DateTime<chrono::Utc>) -> Self {
        /// The last id made at each of the most recent milliseconds ids were made at.
        static LAST: std::sync::Mutex<std::collections::VecDeque<ulid::Ulid>> =
            std::sync::Mutex::new(std::collections::VecDeque::new());
        const KEPT: usize = 256;
        let ms = u64::try_from(now.timestamp_millis()).unwrap_or(0);
        let fresh = || {
            ulid::Ulid::from_datetime(
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )
        };
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        let id = match last.iter().position(|u| u.timestamp_ms() == ms) {
            Some(i) => {
                let next = last[i].increment().unwrap_or_else(fresh);
                last[i] = next;
                next
            }
            None => {
                let next = fresh();
                last.push_back(next);
                if last.len() > KEPT {
                    last.pop_front();
                }
                next
            }
        };
        Self(id)
    }

    /// The id just below this one: an inclusive bound for what lies below it.
    pub fn just_below(self) -> Self {
        Self(ulid::Ulid(self.0.0.saturating_sub(1)))
    }

    /// Above every id made at or before `t`, below every one made after: an exclusive
    /// upper bound for the ids of a range of creation times ending at `t`.
    pub fn after_all_made_by(t: chrono::DateTime<chrono::Utc>) -> Self {
        let ms = u64::try_from(t.timestamp_millis()).unwrap_or(0);
        Self(ulid::Ulid::from_parts(ms.saturating_add(1), 0))
    }
    pub fn from_ulid(ulid: ulid::Ulid) -> Self {
        Self(ulid)
    }
    /// The canonical form, as a JSON Schema pattern: `gen_` and 26 upper-case Crockford
    /// base32 digits, the first at most 7 (a ULID is 128 bits).
    pub const PATTERN: &'static str = "^gen_[0-7][0-9A-HJKMNP-TV-Z]{25}$";

    /// Only the canonical spelling is accepted: one generation has one id, so lower case,
    /// Crockford's aliases (`I`, `L`, `O`) and values beyond 128 bits are refused rather
    /// than read as (or wrapped into) another spelling of some id.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        let raw = value
            .strip_prefix(Self::PREFIX)
            .ok_or_else(|| IdError::Malformed {
                kind: "generation id",
                reason: format!("must start with {:?}", Self::PREFIX),
            })?;
        let ulid = ulid::Ulid::from_string(raw).map_err(|e| IdError::Malformed {
            kind: "generation id",
            reason: e.to_string(),
        })?;
        if ulid.to_string() != raw {
            return Err(IdError::Malformed {
                kind: "generation id",
                reason:
                    "not in canonical form (26 upper-case Crockford base32 digits, the first 0-7)"
                        .into(),
            });
        }
        Ok(Self(ulid))
    }
}

impl Default for GenerationId {
    fn default() -> Self {
        Self::new()
    }
}
impl fmt::Display for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, self.0)
    }
}
impl FromStr for GenerationId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}
impl TryFrom<String> for GenerationId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}
impl From<GenerationId> for String {
    fn from(value: GenerationId) -> Self {
        value.to_string()
    }
}

/// The key that makes an operation happen at most once. Derived keys (`gen:<id>:complete`,
/// `stripe:<event>`) are permanent; client keys (`Idempotency-Key`) live at least 24 hours.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub const MAX_LEN: usize = 255;

    pub fn parse(value: &str) -> Result<Self, IdError> {
        check_token("idempotency key", value, Self::MAX_LEN)?;
        Ok(Self(value.to_owned()))
    }
    /// A key chosen by a client, namespaced by the route so one key cannot collide across
    /// different kinds of request.
    pub fn client(scope: &str, header_value: &str) -> Result<Self, IdError> {
        check_token("Idempotency-Key", header_value, 200)?;
        Self::parse(&format!("client:{scope}:{header_value}"))
    }
    pub fn derived(value: String) -> Self {
        Self(value)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn is_client(&self) -> bool {
        self.0.starts_with("client:")
    }
}
impl TryFrom<String> for IdempotencyKey {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}
impl From<IdempotencyKey> for String {
    fn from(value: IdempotencyKey) -> Self {
        value.0
    }
}
impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Ids appear in the OpenAPI document as plain strings.
macro_rules! string_schema {
    ($t:ty, $desc:expr) => {
        string_schema!($t, $desc, None::<&str>);
    };
    ($t:ty, $desc:expr, $pattern:expr) => {
        impl utoipa::PartialSchema for $t {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .description(Some($desc))
                    .pattern($pattern)
                    .into()
            }
        }
        impl utoipa::ToSchema for $t {}
    };
}
string_schema!(
    WorkspaceId,
    "Workspace id (the org_id claim)",
    Some(WorkspaceId::PATTERN)
);
string_schema!(
    GenerationId,
    "Generation id: gen_ followed by a ULID",
    Some(GenerationId::PATTERN)
);
string_schema!(IdempotencyKey, "Idempotency key");

/// Stripe ids are opaque: Stripe documents no format beyond its object prefixes, test fixtures
/// and the local simulator use shapes of their own, and ids already stored must keep loading.
/// So only what every Stripe id has in common is checked, not the prefix.
fn check_stripe_id(kind: &'static str, value: &str) -> Result<(), IdError> {
    const MAX: usize = 255;
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > MAX {
        return Err(IdError::TooLong { kind, max: MAX });
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(IdError::Malformed {
            kind,
            reason: "only ASCII letters, digits and '_' are allowed".into(),
        });
    }
    Ok(())
}

/// A Stripe id newtype: parsed once, serialized as the same plain string Stripe sent.
macro_rules! stripe_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: &str) -> Result<Self, IdError> {
                check_stripe_id($kind, value)?;
                Ok(Self(value.to_owned()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                check_stripe_id($kind, &value)?;
                Ok(Self(value))
            }
        }
        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }
        impl From<$name> for String {
            fn from(value: $name) -> Self {
                value.0
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        // Hash, Eq and Ord are the string's, so maps keyed by the id can be searched by text.
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        string_schema!($name, $kind);
    };
}

stripe_id!(
    /// A Stripe event (`evt_...`).
    StripeEventId,
    "Stripe event id"
);
stripe_id!(
    /// A Stripe customer (`cus_...`); one per workspace.
    CustomerId,
    "Stripe customer id"
);
stripe_id!(
    /// A Stripe subscription (`sub_...`).
    SubscriptionId,
    "Stripe subscription id"
);
stripe_id!(
    /// A Stripe invoice (`in_...`).
    InvoiceId,
    "Stripe invoice id"
);
stripe_id!(
    /// A Stripe charge (`ch_...`, or `py_...` for some payment methods).
    ChargeId,
    "Stripe charge id"
);
stripe_id!(
    /// A Stripe payment intent (`pi_...`).
    PaymentIntentId,
    "Stripe payment intent id"
);
stripe_id!(
    /// A Stripe Checkout session (`cs_...`).
    CheckoutSessionId,
    "Stripe checkout session id"
);
stripe_id!(
    /// A saved Stripe payment method (`pm_...`, or a legacy `card_...`).
    PaymentMethodId,
    "Stripe payment method id"
);
stripe_id!(
    /// A Stripe refund (`re_...`).
    RefundId,
    "Stripe refund id"
);
stripe_id!(
    /// A Stripe dispute (`dp_...` or `du_...`).
    DisputeId,
    "Stripe dispute id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_ids_refuse_empty_long_and_odd_characters() {
        assert!(WorkspaceId::parse("org_123").is_ok());
        assert_eq!(
            WorkspaceId::parse(""),
            Err(IdError::Empty {
                kind: "workspace id"
            })
        );
        assert!(matches!(
            WorkspaceId::parse(&"a".repeat(129)),
            Err(IdError::TooLong { .. })
        ));
        assert!(matches!(
            WorkspaceId::parse("org#1"),
            Err(IdError::BadCharacter { .. })
        ));
    }

    #[test]
    fn generation_ids_follow_the_clock_and_the_order_they_are_made_in() {
        use chrono::TimeZone;
        let t = chrono::Utc
            .with_ymd_and_hms(2028, 2, 29, 23, 59, 59)
            .unwrap();
        let later = t + chrono::Duration::days(400);
        // Made at one instant, interleaved with ids of another: still in order.
        let a = GenerationId::at(t);
        let x = GenerationId::at(later);
        let b = GenerationId::at(t);
        let y = GenerationId::at(later);
        let c = GenerationId::at(t);
        assert!(a < b && b < c, "{a} {b} {c}");
        assert!(x < y && c < x);
        assert_eq!(a.0.timestamp_ms() as i64, t.timestamp_millis());
        let bound = GenerationId::after_all_made_by(t);
        assert!(c < bound && bound < x);
        assert!(GenerationId::after_all_made_by(t - chrono::Duration::milliseconds(1)) <= a);
        assert!(b.just_below() < b && a <= b.just_below());
    }

    #[test]
    fn generation_ids_round_trip_through_their_text_form() {
        let id = GenerationId::new();
        let text = id.to_string();
        assert!(text.starts_with("gen_"));
        assert_eq!(GenerationId::parse(&text).unwrap(), id);
        assert!(GenerationId::parse("gen_notaulid").is_err());
        assert!(GenerationId::parse("01ARZ3NDEKTSV4RRFFQ69G5FAV").is_err());
    }

    #[test]
    fn client_idempotency_keys_are_namespaced_by_route() {
        let a = IdempotencyKey::client("generations", "abc").unwrap();
        let b = IdempotencyKey::client("adjustments", "abc").unwrap();
        assert_ne!(a, b);
        assert!(a.is_client());
        assert!(IdempotencyKey::client("generations", "has space").is_err());
    }

    #[test]
    fn stripe_ids_accept_the_ids_of_stripes_example_objects() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/stripe");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let id = v["id"].as_str().unwrap();
            assert!(CustomerId::parse(id).is_ok(), "{id} from {path:?}");
            seen += 1;
        }
        assert!(seen > 5);
        let fixture = |name: &str| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(format!("{dir}/{name}.json")).unwrap())
                .unwrap()
        };
        let charge = fixture("charge");
        ChargeId::parse(charge["id"].as_str().unwrap()).unwrap();
        CustomerId::parse(fixture("customer")["id"].as_str().unwrap()).unwrap();
        PaymentIntentId::parse(fixture("payment_intent")["id"].as_str().unwrap()).unwrap();
        PaymentMethodId::parse(charge["payment_method"].as_str().unwrap()).unwrap();
        StripeEventId::parse(fixture("event")["id"].as_str().unwrap()).unwrap();
        SubscriptionId::parse(fixture("subscription")["id"].as_str().unwrap()).unwrap();
        InvoiceId::parse(fixture("invoice")["id"].as_str().unwrap()).unwrap();
        CheckoutSessionId::parse(fixture("checkout.session")["id"].as_str().unwrap()).unwrap();
        RefundId::parse(fixture("refund")["id"].as_str().unwrap()).unwrap();
        DisputeId::parse(fixture("dispute")["id"].as_str().unwrap()).unwrap();
    }

    #[test]
    fn stripe_ids_refuse_empty_long_and_odd_characters() {
        assert_eq!(
            CustomerId::parse(""),
            Err(IdError::Empty {
                kind: "Stripe customer id"
            })
        );
        assert!(CustomerId::parse(&format!("cus_{}", "a".repeat(251))).is_ok());
        assert_eq!(
            CustomerId::parse(&format!("cus_{}", "a".repeat(252))),
            Err(IdError::TooLong {
                kind: "Stripe customer id",
                max: 255
            })
        );
        for bad in [
            "cus_1\n",
            "cus\t1",
            "cus_\u{0}",
            "cus 1",
            "cus-1",
            "cus_1/../x",
            "cus_é",
        ] {
            assert!(
                matches!(CustomerId::parse(bad), Err(IdError::Malformed { .. })),
                "{bad:?}"
            );
        }
        // The prefix is not checked: other shapes are used by fixtures and the simulator.
        assert!(InvoiceId::parse("invoice_sim01").is_ok());
    }

    #[test]
    fn stripe_ids_serialize_as_the_plain_string() {
        let id = SubscriptionId::parse("sub_1Pgc6rB7WZ01zgkWNy0Cn5nw").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"sub_1Pgc6rB7WZ01zgkWNy0Cn5nw\"");
        assert_eq!(serde_json::from_str::<SubscriptionId>(&json).unwrap(), id);
        assert_eq!(id.to_string(), id.as_str());
        assert!(serde_json::from_str::<SubscriptionId>("\"\"").is_err());
        assert!(serde_json::from_str::<SubscriptionId>("\"sub 1\"").is_err());
    }
}

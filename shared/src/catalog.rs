//! The catalog: plans, packs, add-on units, models and what a generation costs. It is data
//! (`catalog.json`, shipped with the crate, replaceable through `TALLY_CATALOG`) and is
//! validated once at start-up so a bad edit stops the process with a clear message.
//!
//! Costs are integer arithmetic. Per-second prices are in thousandths of a credit
//! (`per_second_milli`); rate times seconds is rounded **up** to a whole credit, then
//! multiplied by the resolution multiplier and by the item count, so a higher resolution
//! costs exactly its multiple of the 1080p price (2K twice, 4K three times), as the help
//! centre promises.

use crate::money::{Cents, Credits};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;
use thiserror::Error;
use utoipa::ToSchema;

/// The catalog shipped with this build.
pub const DEFAULT_CATALOG: &str = include_str!("../catalog.json");

/// Most items one request may ask for.
pub const MAX_COUNT: u32 = 16;

#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("cannot read catalog file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("catalog is not valid JSON of the expected shape: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("catalog is invalid: {0}")]
    Invalid(String),
}

/// What kind of work a model does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Workflow {
    Image,
    Video,
    Avatar,
    Training,
}

impl Workflow {
    pub fn as_str(self) -> &'static str {
        match self {
            Workflow::Image => "image",
            Workflow::Video => "video",
            Workflow::Avatar => "avatar",
            Workflow::Training => "training",
        }
    }
}

/// Output resolution of an image or video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum Resolution {
    #[serde(rename = "1080p")]
    P1080,
    #[serde(rename = "2k")]
    K2,
    #[serde(rename = "4k")]
    K4,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub id: String,
    pub name: String,
    pub audience: String,
    pub monthly_credits: Credits,
    pub monthly_price_cents: Cents,
    pub custom_model_slots: u32,
    pub support: String,
    pub pack_discount_pct: u8,
    pub rollover_days: u32,
    /// Which add-on unit this plan can buy.
    pub addon: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Pack {
    pub id: String,
    pub credits: Credits,
    pub price_cents: Cents,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Addon {
    pub id: String,
    pub credits_per_unit: Credits,
    pub unit_price_cents: Cents,
    /// Charged per seat (individual plans) rather than once for the workspace (team).
    pub per_user: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolutionOption {
    pub id: Resolution,
    pub multiplier: u64,
}

/// How a model is priced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Pricing {
    /// Credits per produced item (images).
    PerItem(Credits),
    /// Thousandths of a credit per second of output (video, avatar).
    PerSecondMilli(u64),
    /// One price for the whole job (training).
    Flat(Credits),
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Model {
    pub id: String,
    pub name: String,
    pub workflow: Workflow,
    pub pricing: Pricing,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration_s: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HoldMinutes {
    pub image: u32,
    pub video: u32,
    pub avatar: u32,
    pub training: u32,
}

/// The whole catalog, as loaded from JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    #[serde(default)]
    pub notes: Vec<String>,
    pub currency: String,
    pub yearly_discount_pct: u8,
    pub hold_minutes: HoldMinutes,
    pub plans: Vec<Plan>,
    pub packs: Vec<Pack>,
    pub addons: Vec<Addon>,
    pub resolutions: Vec<ResolutionOption>,
    pub models: Vec<Model>,
}

/// A request to price a generation, already shaped (not yet validated against the catalog).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerationSpec {
    pub workflow: Workflow,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
}

/// The price of a generation and how it was reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Estimate {
    pub credits: Credits,
    pub workflow: Workflow,
    pub model: String,
    pub resolution: Option<Resolution>,
    pub multiplier: u64,
    pub duration_s: Option<u32>,
    pub count: u32,
    /// Credits for one item before the count is applied (already rounded up).
    pub per_item: Credits,
}

/// Why a generation request cannot be priced. Each names the offending field.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: &'static str,
    pub message: String,
}

fn spec_err(field: &'static str, message: impl Into<String>) -> SpecError {
    SpecError {
        field,
        message: message.into(),
    }
}

impl Catalog {
    /// The catalog in the file at `path` (`TALLY_CATALOG`), or the one shipped with the
    /// build.
    pub fn load(path: Option<&Path>) -> Result<Self, CatalogError> {
        match path {
            Some(path) => Self::from_file(path),
            None => Self::from_json(DEFAULT_CATALOG),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|source| CatalogError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text)
    }

    pub fn from_json(text: &str) -> Result<Self, CatalogError> {
        let catalog: Catalog = serde_json::from_str(text)?;
        catalog.validate()?;
        Ok(catalog)
    }

    /// The shipped catalog; it is validated by a unit test so this cannot fail at run time.
    pub fn builtin() -> Self {
        Self::from_json(DEFAULT_CATALOG).expect("the shipped catalog is valid")
    }

    fn validate(&self) -> Result<(), CatalogError> {
        let bad = |m: String| Err(CatalogError::Invalid(m));
        if self.currency != "usd" {
            return bad(format!("currency must be \"usd\", not {:?}", self.currency));
        }
        if self.yearly_discount_pct >= 100 {
            return bad("yearly_discount_pct must be below 100".into());
        }
        let h = &self.hold_minutes;
        if [h.image, h.video, h.avatar, h.training].contains(&0) {
            return bad("every hold_minutes value must be at least 1".into());
        }
        unique("plan", self.plans.iter().map(|p| p.id.as_str()))?;
        unique("pack", self.packs.iter().map(|p| p.id.as_str()))?;
        unique("add-on", self.addons.iter().map(|a| a.id.as_str()))?;
        unique("model", self.models.iter().map(|m| m.id.as_str()))?;
        if self.plans.is_empty() {
            return bad("at least one plan is required".into());
        }
        for p in &self.plans {
            if p.monthly_credits == Credits::ZERO || p.monthly_price_cents == Cents::ZERO {
                return bad(format!("plan {}: credits and price must be positive", p.id));
            }
            if p.monthly_price_cents.checked_mul(12).is_none() {
                return bad(format!("plan {}: the yearly price is too large", p.id));
            }
            // Every grant is bounded by the ledger's request limit; a plan whose allowance
            // could not be granted would be charged for nothing.
            if p.monthly_credits.get() > crate::money::MAX_CREDITS_PER_REQUEST {
                return bad(format!(
                    "plan {}: monthly_credits is above the grant limit",
                    p.id
                ));
            }
            if p.pack_discount_pct >= 100 {
                return bad(format!(
                    "plan {}: pack_discount_pct must be below 100",
                    p.id
                ));
            }
            if self.addon(&p.addon).is_none() {
                return bad(format!("plan {}: unknown add-on {:?}", p.id, p.addon));
            }
        }
        for p in &self.packs {
            if p.credits == Credits::ZERO || p.price_cents == Cents::ZERO {
                return bad(format!("pack {}: credits and price must be positive", p.id));
            }
            // Checkout buys up to 100 packs in one grant.
            if p.credits.get().saturating_mul(100) > crate::money::MAX_CREDITS_PER_REQUEST {
                return bad(format!("pack {}: credits are above the grant limit", p.id));
            }
        }
        for a in &self.addons {
            if a.credits_per_unit == Credits::ZERO || a.unit_price_cents == Cents::ZERO {
                return bad(format!(
                    "add-on {}: credits and price must be positive",
                    a.id
                ));
            }
            if a.unit_price_cents.checked_mul(12).is_none() {
                return bad(format!("add-on {}: the yearly price is too large", a.id));
            }
            // A workspace holds up to 100 units, granted at once.
            if a.credits_per_unit.get().saturating_mul(100) > crate::money::MAX_CREDITS_PER_REQUEST
            {
                return bad(format!(
                    "add-on {}: credits_per_unit is above the grant limit",
                    a.id
                ));
            }
        }
        for r in [Resolution::P1080, Resolution::K2, Resolution::K4] {
            match self.resolutions.iter().filter(|o| o.id == r).count() {
                1 => {}
                _ => return bad(format!("resolution {r:?} must be listed exactly once")),
            }
        }
        if self.resolutions.iter().any(|r| r.multiplier == 0) {
            return bad("resolution multipliers must be at least 1".into());
        }
        for m in &self.models {
            let ok = match (m.workflow, m.pricing) {
                (Workflow::Image, Pricing::PerItem(c)) | (Workflow::Training, Pricing::Flat(c)) => {
                    c > Credits::ZERO
                }
                (Workflow::Video | Workflow::Avatar, Pricing::PerSecondMilli(n)) => n > 0,
                _ => false,
            };
            if !ok {
                return bad(format!(
                    "model {}: a {} model needs a positive {} price",
                    m.id,
                    m.workflow.as_str(),
                    match m.workflow {
                        Workflow::Image => "per_item",
                        Workflow::Video | Workflow::Avatar => "per_second_milli",
                        Workflow::Training => "flat",
                    }
                ));
            }
            if m.max_duration_s == Some(0) {
                return bad(format!("model {}: max_duration_s must be positive", m.id));
            }
        }
        Ok(())
    }

    pub fn plan(&self, id: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.id == id)
    }
    pub fn pack(&self, id: &str) -> Option<&Pack> {
        self.packs.iter().find(|p| p.id == id)
    }
    pub fn addon(&self, id: &str) -> Option<&Addon> {
        self.addons.iter().find(|a| a.id == id)
    }
    pub fn model(&self, id: &str) -> Option<&Model> {
        self.models.iter().find(|m| m.id == id)
    }

    /// The yearly price of a plan: twelve months less the yearly discount, rounded down.
    pub fn yearly_price(&self, plan: &Plan) -> Cents {
        plan.monthly_price_cents
            .checked_mul(12)
            .expect("catalog validation bounds monthly prices")
            .discounted(self.yearly_discount_pct)
    }

    /// How long a hold on this workflow may stay open before it is released.
    pub fn hold_lifetime(&self, workflow: Workflow) -> chrono::Duration {
        let m = match workflow {
            Workflow::Image => self.hold_minutes.image,
            Workflow::Video => self.hold_minutes.video,
            Workflow::Avatar => self.hold_minutes.avatar,
            Workflow::Training => self.hold_minutes.training,
        };
        chrono::Duration::minutes(m as i64)
    }

    fn multiplier(&self, r: Resolution) -> u64 {
        self.resolutions
            .iter()
            .find(|o| o.id == r)
            .map(|o| o.multiplier)
            .unwrap_or(1)
    }

    /// Prices a generation, refusing anything the model cannot do.
    pub fn estimate(&self, spec: &GenerationSpec) -> Result<Estimate, SpecError> {
        let model = self
            .model(&spec.model)
            .ok_or_else(|| spec_err("model", format!("unknown model {:?}", spec.model)))?;
        if model.workflow != spec.workflow {
            return Err(spec_err(
                "workflow",
                format!(
                    "model {:?} is a {} model, not {}",
                    model.id,
                    model.workflow.as_str(),
                    spec.workflow.as_str()
                ),
            ));
        }
        let count = spec.count.unwrap_or(1);
        if count == 0 || count > MAX_COUNT {
            return Err(spec_err(
                "count",
                format!("must be between 1 and {MAX_COUNT}"),
            ));
        }
        let (resolution, multiplier) = match (model.workflow, spec.resolution) {
            (Workflow::Training, Some(_)) => {
                return Err(spec_err("resolution", "training takes no resolution"));
            }
            (Workflow::Training, None) => (None, 1),
            (_, r) => {
                let r = r.unwrap_or(Resolution::P1080);
                (Some(r), self.multiplier(r))
            }
        };
        // Overflow needs absurd catalog prices; it is refused like any unpriceable request.
        let too_large = || spec_err("model", "the price of this request is out of range");
        let per_item = match model.pricing {
            Pricing::PerItem(credits) => {
                if spec.duration_s.is_some() {
                    return Err(spec_err("duration_s", "image models take no duration"));
                }
                credits.checked_mul(multiplier).ok_or_else(too_large)?
            }
            Pricing::PerSecondMilli(milli) => {
                let seconds = spec
                    .duration_s
                    .ok_or_else(|| spec_err("duration_s", "required for video and avatar"))?;
                let max = model.max_duration_s.unwrap_or(600);
                if seconds == 0 || seconds > max {
                    return Err(spec_err(
                        "duration_s",
                        format!("must be between 1 and {max} seconds for {}", model.id),
                    ));
                }
                let at_1080p = milli
                    .checked_mul(seconds as u64)
                    .ok_or_else(too_large)?
                    .div_ceil(1000);
                Credits::new(at_1080p.checked_mul(multiplier).ok_or_else(too_large)?)
            }
            Pricing::Flat(credits) => {
                if spec.duration_s.is_some() {
                    return Err(spec_err("duration_s", "training takes no duration"));
                }
                if count != 1 {
                    return Err(spec_err("count", "train one custom model at a time"));
                }
                credits
            }
        };
        Ok(Estimate {
            credits: per_item.checked_mul(count as u64).ok_or_else(too_large)?,
            workflow: model.workflow,
            model: model.id.clone(),
            resolution,
            multiplier,
            duration_s: spec.duration_s,
            count,
            per_item,
        })
    }
}

fn unique<'a>(kind: &str, ids: impl Iterator<Item = &'a str>) -> Result<(), CatalogError> {
    let mut seen = HashSet::new();
    for id in ids {
        if id.is_empty() {
            return Err(CatalogError::Invalid(format!("a {kind} has an empty id")));
        }
        if !seen.insert(id) {
            return Err(CatalogError::Invalid(format!(
                "{kind} id {id:?} is listed twice"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(model: &str, workflow: Workflow) -> GenerationSpec {
        GenerationSpec {
            workflow,
            model: model.into(),
            resolution: None,
            duration_s: None,
            count: None,
        }
    }

    #[test]
    fn the_shipped_catalog_is_valid_and_keeps_the_promised_numbers() {
        let c = Catalog::builtin();
        assert_eq!(c.plan("max").unwrap().monthly_credits, Credits::new(400));
        assert_eq!(
            c.plan("generative").unwrap().monthly_credits,
            Credits::new(900)
        );
        assert_eq!(c.plan("team").unwrap().monthly_credits, Credits::new(6000));
        for p in ["max", "generative", "team"] {
            assert_eq!(c.plan(p).unwrap().pack_discount_pct, 20, "{p}");
        }
        assert!(c.plans.iter().all(|p| p.rollover_days == 30));
        let (small, big) = (c.pack("pack_100").unwrap(), c.pack("pack_500").unwrap());
        // 500-pack per-credit price is 18% below the 100-pack's: 4100/500 = 0.82 * 1000/100.
        assert_eq!(
            big.price_cents.get() * small.credits.get() * 100,
            small.price_cents.get() * big.credits.get() * 82
        );
        let ind = c.addon("individual").unwrap();
        assert_eq!(
            (ind.credits_per_unit, ind.unit_price_cents, ind.per_user),
            (Credits::new(60), Cents::new(1000), true)
        );
        let team = c.addon("team").unwrap();
        assert_eq!(
            (team.credits_per_unit, team.unit_price_cents, team.per_user),
            (Credits::new(200), Cents::new(3000), false)
        );
        assert_eq!(c.yearly_price(c.plan("max").unwrap()), Cents::new(20880));
    }

    #[test]
    fn images_cost_two_to_three_credits_times_resolution_and_count() {
        let c = Catalog::builtin();
        let mut s = spec("imagen-3", Workflow::Image);
        assert_eq!(c.estimate(&s).unwrap().credits, Credits::new(3));
        s.resolution = Some(Resolution::K2);
        assert_eq!(c.estimate(&s).unwrap().credits, Credits::new(6));
        s.resolution = Some(Resolution::K4);
        s.count = Some(4);
        assert_eq!(c.estimate(&s).unwrap().credits, Credits::new(36));
        assert_eq!(
            c.estimate(&spec("flux-schnell", Workflow::Image))
                .unwrap()
                .credits,
            Credits::new(2)
        );
    }

    #[test]
    fn a_ten_second_video_costs_between_8_and_20_credits_by_tier() {
        let c = Catalog::builtin();
        let cost = |m: &str| {
            let mut s = spec(m, Workflow::Video);
            s.duration_s = Some(10);
            c.estimate(&s).unwrap().credits.get()
        };
        assert_eq!(cost("video-lite"), 8);
        assert_eq!(cost("video-pro"), 12);
        assert_eq!(cost("video-ultra"), 20);
    }

    #[test]
    fn higher_resolutions_cost_exactly_their_multiple_of_1080p() {
        // The help centre: "Higher resolutions cost more (2K = 2x, 4K = 3x)".
        let c = Catalog::builtin();
        for model in &c.models {
            if model.workflow == Workflow::Training {
                continue;
            }
            let durations: Vec<Option<u32>> = match model.pricing {
                Pricing::PerSecondMilli(_) => (1..=model.max_duration_s.unwrap_or(600))
                    .map(Some)
                    .collect(),
                _ => vec![None],
            };
            for duration_s in durations {
                for count in [1, 3, MAX_COUNT] {
                    let cost = |resolution| {
                        let s = GenerationSpec {
                            workflow: model.workflow,
                            model: model.id.clone(),
                            resolution: Some(resolution),
                            duration_s,
                            count: Some(count),
                        };
                        c.estimate(&s).unwrap().credits.get()
                    };
                    let base = cost(Resolution::P1080);
                    let at = format!("{} {duration_s:?}s x{count}", model.id);
                    assert_eq!(cost(Resolution::K2), 2 * base, "{at}");
                    assert_eq!(cost(Resolution::K4), 3 * base, "{at}");
                }
            }
        }
    }

    #[test]
    fn fractional_credits_round_up_per_item() {
        let c = Catalog::builtin();
        let mut s = spec("video-lite", Workflow::Video);
        s.duration_s = Some(3); // 2.4 credits -> 3
        s.count = Some(2);
        let e = c.estimate(&s).unwrap();
        assert_eq!((e.per_item.get(), e.credits.get()), (3, 6));
    }

    #[test]
    fn training_costs_400_and_refuses_resolution_duration_and_batches() {
        let c = Catalog::builtin();
        let s = spec("custom-model", Workflow::Training);
        assert_eq!(c.estimate(&s).unwrap().credits, Credits::new(400));
        let mut r = s.clone();
        r.resolution = Some(Resolution::K4);
        assert_eq!(c.estimate(&r).unwrap_err().field, "resolution");
        let mut n = s.clone();
        n.count = Some(2);
        assert_eq!(c.estimate(&n).unwrap_err().field, "count");
    }

    #[test]
    fn mismatched_or_unknown_models_and_bad_durations_are_refused() {
        let c = Catalog::builtin();
        assert_eq!(
            c.estimate(&spec("imagen-3", Workflow::Video))
                .unwrap_err()
                .field,
            "workflow"
        );
        assert_eq!(
            c.estimate(&spec("nope", Workflow::Image))
                .unwrap_err()
                .field,
            "model"
        );
        assert_eq!(
            c.estimate(&spec("video-pro", Workflow::Video))
                .unwrap_err()
                .field,
            "duration_s"
        );
        let mut s = spec("video-ultra", Workflow::Video);
        s.duration_s = Some(31);
        assert_eq!(c.estimate(&s).unwrap_err().field, "duration_s");
        let mut z = spec("imagen-3", Workflow::Image);
        z.count = Some(0);
        assert_eq!(c.estimate(&z).unwrap_err().field, "count");
    }

    #[test]
    fn a_price_that_overflows_is_refused_rather_than_wrapped() {
        let mut c: serde_json::Value = serde_json::from_str(DEFAULT_CATALOG).unwrap();
        c["models"][0]["pricing"] = serde_json::json!({"per_item": u64::MAX / 2});
        let c = Catalog::from_json(&c.to_string()).unwrap();
        let mut s = spec("flux-schnell", Workflow::Image);
        assert_eq!(c.estimate(&s).unwrap().credits, Credits::new(u64::MAX / 2));
        s.count = Some(3);
        assert_eq!(c.estimate(&s).unwrap_err().field, "model");
    }

    #[test]
    fn a_broken_catalog_is_refused_with_a_clear_reason() {
        let mut c: serde_json::Value = serde_json::from_str(DEFAULT_CATALOG).unwrap();
        c["plans"][1]["id"] = "plus".into();
        let err = Catalog::from_json(&c.to_string()).unwrap_err().to_string();
        assert!(err.contains("plan id \"plus\" is listed twice"), "{err}");

        let mut c: serde_json::Value = serde_json::from_str(DEFAULT_CATALOG).unwrap();
        c["models"][0]["pricing"] = serde_json::json!({"flat": 3});
        let err = Catalog::from_json(&c.to_string()).unwrap_err().to_string();
        assert!(err.contains("needs a positive per_item price"), "{err}");

        let mut c: serde_json::Value = serde_json::from_str(DEFAULT_CATALOG).unwrap();
        c["plans"][0]["monthly_price_cents"] = u64::MAX.into();
        let err = Catalog::from_json(&c.to_string()).unwrap_err().to_string();
        assert!(err.contains("the yearly price is too large"), "{err}");

        let err = Catalog::from_json("{\"currency\": 5}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid JSON"), "{err}");
    }
}

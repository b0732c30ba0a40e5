//! Weighted objective lists: `--objective name[:weight],...`, each weight a
//! schedule over training, and `--schedule` trading the first objective
//! against the rest (BCIF's hand-over).

use candle_core::{Tensor, Var};

use super::objectives::{self, Batch, Objective, ObjectiveEnv, ObjectiveParams};
use crate::Result;

/// A loss weight as a function of training progress p in [0, 1).
#[derive(Clone, Debug, PartialEq)]
pub enum Weight {
    Constant(f64),
    /// From `a` at p = 0 to `b` at p = 1.
    Linear(f64, f64),
    /// From `a` to `b` along half a cosine.
    Cosine(f64, f64),
    /// Linear between (progress, value) breakpoints; flat outside them.
    Piecewise(Vec<(f64, f64)>),
}

impl Weight {
    /// The BCIF paper's schedule for the contrastive weight: 1.0 through the
    /// warm-up (10%), then linearly down to 0.2 by half-way, then 0.2.
    pub fn bcif() -> Self {
        Self::Piecewise(vec![(0.0, 1.0), (0.1, 1.0), (0.5, 0.2), (1.0, 0.2)])
    }

    pub fn at(&self, p: f64) -> f64 {
        let p = p.clamp(0.0, 1.0);
        match self {
            Self::Constant(w) => *w,
            Self::Linear(a, b) => a + (b - a) * p,
            Self::Cosine(a, b) => b + (a - b) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
            Self::Piecewise(pts) => {
                let first = pts[0];
                if p <= first.0 {
                    return first.1;
                }
                for w in pts.windows(2) {
                    let ((x0, y0), (x1, y1)) = (w[0], w[1]);
                    if p <= x1 {
                        return if x1 > x0 {
                            y0 + (y1 - y0) * (p - x0) / (x1 - x0)
                        } else {
                            y1
                        };
                    }
                }
                pts[pts.len() - 1].1
            }
        }
    }

    /// `0.5`, `linear(A,B)`, `cosine(A,B)` or `piecewise(P:V,P:V,...)`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| crate::Error::Report(format!("weight `{s}`: {why}"));
        let num = |t: &str| {
            t.trim()
                .parse::<f64>()
                .map_err(|_| bad(&format!("`{}` is not a number", t.trim())))
        };
        let s = s.trim();
        let Some((kind, rest)) = s.split_once('(') else {
            return Ok(Self::Constant(num(s)?));
        };
        let args = rest.strip_suffix(')').ok_or_else(|| bad("missing `)`"))?;
        let items: Vec<&str> = args.split(',').collect();
        let pair = || -> Result<(f64, f64)> {
            match items[..] {
                [a, b] => Ok((num(a)?, num(b)?)),
                _ => Err(bad("expected two values, start and end")),
            }
        };
        match kind.trim() {
            "linear" => pair().map(|(a, b)| Self::Linear(a, b)),
            "cosine" => pair().map(|(a, b)| Self::Cosine(a, b)),
            "piecewise" => {
                let mut pts = Vec::new();
                for it in &items {
                    let (p, v) = it
                        .split_once(':')
                        .ok_or_else(|| bad("piecewise points are PROGRESS:VALUE"))?;
                    pts.push((num(p)?, num(v)?));
                }
                if pts.is_empty() || pts.windows(2).any(|w| w[1].0 < w[0].0) {
                    return Err(bad("piecewise points must be given in increasing progress"));
                }
                Ok(Self::Piecewise(pts))
            }
            other => Err(bad(&format!(
                "unknown schedule `{other}` (constant, linear, cosine, piecewise)"
            ))),
        }
    }
}

/// A weighted sum of objectives, each weight a schedule over training.
/// With a `trade` schedule λ(p) (`--schedule bcif`), the first objective's
/// weight is multiplied by λ(p) and every other's by 1 − λ(p): the BCIF
/// paper's hand-over from the contrastive objective to a second one.
pub struct Combined {
    pub parts: Vec<(Weight, Box<dyn Objective>)>,
    pub trade: Option<Weight>,
    /// λ of the EWC penalty (`ewc:λ`), which acts on the weights, not on a
    /// batch's features: the trainer adds it (see `train::ewc`).
    pub ewc: Option<Weight>,
}

impl Combined {
    /// Every objective's weight at progress `p` (step / steps).
    pub fn weights(&self, p: f64) -> Vec<f64> {
        let lambda = self.trade.as_ref().map(|t| t.at(p));
        self.parts
            .iter()
            .enumerate()
            .map(|(i, (w, _))| {
                w.at(p)
                    * match lambda {
                        None => 1.0,
                        Some(l) if i == 0 => l,
                        Some(l) => 1.0 - l,
                    }
            })
            .collect()
    }

    /// The objective as it stands at progress `p`.
    pub fn at(&self, p: f64) -> AtProgress<'_> {
        AtProgress {
            parts: &self.parts,
            weights: self.weights(p),
        }
    }

    /// Part `i` alone, at weight 1 (the gradient-conflict probe).
    pub fn only(&self, i: usize) -> AtProgress<'_> {
        AtProgress {
            parts: &self.parts,
            weights: (0..self.parts.len())
                .map(|j| if j == i { 1.0 } else { 0.0 })
                .collect(),
        }
    }

    pub fn vars(&self) -> Vec<(String, Var)> {
        self.parts.iter().flat_map(|(_, o)| o.vars()).collect()
    }

    pub fn uses(&self, name: &str) -> bool {
        self.parts.iter().any(|(_, o)| o.name() == name)
    }
}

/// A [`Combined`] objective with its weights fixed at one point of training.
pub struct AtProgress<'a> {
    parts: &'a [(Weight, Box<dyn Objective>)],
    pub weights: Vec<f64>,
}

impl Objective for AtProgress<'_> {
    fn name(&self) -> &str {
        "combined"
    }
    fn loss(&self, b: &Batch) -> Result<Tensor> {
        self.weigh(b, |i| self.parts[i].1.loss(b))
    }
    /// The weighted local losses; `None` when a part in use has none.
    fn local_loss(&self, b: &Batch, rows: std::ops::Range<usize>) -> Option<Result<Tensor>> {
        let mut parts = Vec::new();
        for (i, w) in self.weights.iter().enumerate() {
            if *w != 0.0 {
                parts.push((i, self.parts[i].1.local_loss(b, rows.clone())?));
            }
        }
        let mut it = parts.into_iter();
        Some(self.weigh(b, |i| {
            let (j, l) = it.next().expect("one local loss per weighted part");
            debug_assert_eq!(i, j);
            l
        }))
    }
}

impl AtProgress<'_> {
    /// The weighted sum of the parts' losses, `part(i)` giving part i's
    /// (asked only for parts whose weight is not 0).
    pub fn weigh(
        &self,
        b: &Batch,
        mut part: impl FnMut(usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for (i, w) in self.weights.iter().enumerate() {
            if *w == 0.0 {
                continue; // e.g. a second objective before a schedule lets it in
            }
            let l = (part(i)? * *w)?;
            total = Some(match total {
                None => l,
                Some(t) => (t + l)?,
            });
        }
        match total {
            Some(t) => Ok(t),
            // Every weight is 0 at this point of the schedule: a zero loss
            // that still reaches the features, so every gradient is 0.
            None => Ok((b.image.sum_all()? * 0.0)?),
        }
    }
}

/// Splits at commas outside parentheses.
pub(super) fn top_level_items(spec: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0i32, 0, Vec::new());
    for (i, c) in spec.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&spec[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&spec[start..]);
    out
}

/// The objective names in a `--objective` list, weights aside.
pub fn names(spec: &str) -> Vec<String> {
    top_level_items(spec)
        .into_iter()
        .map(|i| i.split(':').next().unwrap_or("").trim().to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

/// Parses `name[:weight],...` (e.g. `infonce,daa:0.5,geometric:linear(0,1)`),
/// with `schedule` (`bcif`, or any weight schedule) trading the first
/// objective against the rest. Names come from [`objectives::REGISTRY`].
pub fn parse_objectives(
    spec: &str,
    params: &ObjectiveParams,
    schedule: Option<&str>,
    env: &ObjectiveEnv,
) -> Result<Combined> {
    let mut parts: Vec<(Weight, Box<dyn Objective>)> = Vec::new();
    let mut ewc = None;
    for item in top_level_items(spec)
        .into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let (name, w) = match item.split_once(':') {
            Some((n, w)) => (
                n.trim(),
                Weight::parse(w)
                    .map_err(|e| crate::Error::Report(format!("objective `{item}`: {e}")))?,
            ),
            None => (item, Weight::Constant(1.0)),
        };
        if name == "ewc" {
            ewc = Some(w);
            continue;
        }
        let Some(entry) = objectives::lookup(name) else {
            return Err(crate::Error::Report(format!(
                "unknown objective `{name}` (available: {})",
                objectives::available()
            )));
        };
        parts.push((w, (entry.build)(params, env)?));
    }
    if parts.is_empty() {
        return Err(crate::Error::Report(
            if ewc.is_some() {
                "`ewc` only holds weights in place: combine it with a data objective, e.g. infonce,ewc:100"
            } else {
                "no objective given"
            }
            .into(),
        ));
    }
    let trade =
        match schedule.map(str::trim) {
            None | Some("") | Some("none") => None,
            Some("bcif") => Some(Weight::bcif()),
            Some(other) => Some(Weight::parse(other).map_err(|e| {
                crate::Error::Report(format!("--schedule: {e} (or a preset: bcif)"))
            })?),
        };
    if trade.is_some() && parts.len() < 2 {
        return Err(crate::Error::Report(
            "--schedule trades the first objective against a second one: give two or more in --objective".into(),
        ));
    }
    Ok(Combined { parts, trade, ewc })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedules_follow_their_formulas() {
        let b = Weight::bcif();
        for (p, want) in [(0.0, 1.0), (0.1, 1.0), (0.3, 0.6), (0.5, 0.2), (0.9, 0.2)] {
            assert!((b.at(p) - want).abs() < 1e-12, "bcif({p}) = {}", b.at(p));
        }
        assert_eq!(Weight::parse("linear(0,2)").unwrap().at(0.25), 0.5);
        let c = Weight::parse("cosine(1, 0)").unwrap();
        assert!((c.at(0.5) - 0.5).abs() < 1e-12 && c.at(0.0) == 1.0 && c.at(1.0).abs() < 1e-12);
        assert_eq!(Weight::parse("0.5").unwrap(), Weight::Constant(0.5));
        assert!(Weight::parse("piecewise(0.5:1,0.1:2)").is_err());
        assert!(Weight::parse("wobbly(1,2)").is_err());
    }

    #[test]
    fn objective_lists_parse_with_schedules_inside_parentheses() {
        let p = ObjectiveParams::default();
        let env = ObjectiveEnv {
            dim: 8,
            seed: 0,
            device: &Device::Cpu,
            teacher_dim: None,
        };
        assert_eq!(
            names("infonce, geometric:piecewise(0:0,1:1),ewc:5"),
            ["infonce", "geometric", "ewc"]
        );
        let c = parse_objectives(
            "infonce, daa:0.5, geometric:piecewise(0:0,0.5:1)",
            &p,
            None,
            &env,
        )
        .unwrap();
        let names: Vec<&str> = c.parts.iter().map(|(_, o)| o.name()).collect();
        assert_eq!(names, ["infonce", "daa", "geometric"]);
        assert_eq!(c.weights(0.25), vec![1.0, 0.5, 0.5]);
        let t = parse_objectives("infonce,geometric", &p, Some("bcif"), &env).unwrap();
        let w = t.weights(0.3);
        assert!(
            (w[0] - 0.6).abs() < 1e-12 && (w[1] - 0.4).abs() < 1e-12,
            "{w:?}"
        );
        assert!(parse_objectives("infonce", &p, Some("bcif"), &env).is_err());
        let e = parse_objectives("infonce,adversary", &p, None, &env)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("unknown objective `adversary`"), "{e}");
        let w = parse_objectives("infonce,ewc:linear(0,100)", &p, None, &env).unwrap();
        assert_eq!(
            (w.parts.len(), w.ewc.as_ref().map(|e| e.at(0.5))),
            (1, Some(50.0))
        );
        assert!(parse_objectives("ewc:100", &p, None, &env).is_err());
        let a = parse_objectives("infonce,adversarial:0.1", &p, None, &env).unwrap();
        assert_eq!(a.vars().len(), 4);
    }
}

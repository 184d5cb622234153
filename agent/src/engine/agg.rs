//! `win.aggregate`'s accumulators: statistics of numeric fields computed
//! in Rust, merged when session windows merge.

use super::snapshot::{Dec, DecResult, Enc};
use crate::flow::{AggSpec, Stat};
use crate::value::Value;

/// Running statistics of one field in one window.
#[derive(Clone, Debug, Default)]
struct FieldAcc {
    count: u64,
    sum: f64,
    mean: f64,
    m2: f64,
    min: f64,
    max: f64,
    first: Option<Num>,
    last: Option<Num>,
    /// Kept only when a percentile is asked for.
    values: Option<Vec<f64>>,
    /// Whether to keep the running variance (costs a division per value).
    variance: bool,
}

impl FieldAcc {
    fn add(&mut self, raw: &Value, x: f64) {
        self.count += 1;
        self.sum += x;
        if self.variance {
            let delta = x - self.mean;
            self.mean += delta / self.count as f64;
            self.m2 += delta * (x - self.mean);
        }
        if self.count == 1 {
            self.min = x;
            self.max = x;
            self.first = Num::of(raw);
        } else {
            self.min = self.min.min(x);
            self.max = self.max.max(x);
        }
        self.last = Num::of(raw);
        if let Some(v) = &mut self.values {
            v.push(x);
        }
    }

    /// Merge `newer` (the window merged in) into `self` (the older one).
    fn merge(&mut self, newer: FieldAcc) {
        if newer.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = newer;
            return;
        }
        let n = (self.count + newer.count) as f64;
        let delta = newer.mean - self.mean;
        self.m2 += newer.m2 + delta * delta * self.count as f64 * newer.count as f64 / n;
        self.mean += delta * newer.count as f64 / n;
        self.count += newer.count;
        self.sum += newer.sum;
        self.min = self.min.min(newer.min);
        self.max = self.max.max(newer.max);
        if newer.last.is_some() {
            self.last = newer.last;
        }
        if let (Some(a), Some(b)) = (&mut self.values, newer.values) {
            a.extend(b);
        }
    }

    fn stat(&self, s: Stat) -> Value {
        let n = self.count;
        let opt = |x: f64| if n == 0 { Value::Null } else { Value::Float(x) };
        match s {
            Stat::Count => Value::Int(n as i64),
            Stat::Sum => Value::Float(self.sum),
            Stat::Mean => opt(self.sum / n as f64),
            Stat::Min => opt(self.min),
            Stat::Max => opt(self.max),
            Stat::Stddev => opt((self.m2 / n as f64).max(0.0).sqrt()),
            Stat::First => self.first.map_or(Value::Null, Num::value),
            Stat::Last => self.last.map_or(Value::Null, Num::value),
            Stat::P50 => self.percentile(50),
            Stat::P90 => self.percentile(90),
            Stat::P99 => self.percentile(99),
        }
    }

    /// Nearest rank: the smallest value with at least p% of values at or below it.
    fn percentile(&self, p: u64) -> Value {
        match &self.values {
            Some(v) if !v.is_empty() => {
                let mut sorted = v.clone();
                sorted.sort_by(f64::total_cmp);
                let n = sorted.len() as u64;
                let rank = (p * n).div_ceil(100).max(1);
                Value::Float(sorted[(rank - 1) as usize])
            }
            _ => Value::Null,
        }
    }
}

/// A number as it came: `first` and `last` give back an int or a float.
#[derive(Clone, Copy, Debug)]
enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    fn of(v: &Value) -> Option<Num> {
        match v {
            Value::Int(n) => Some(Num::Int(*n)),
            Value::Float(x) => Some(Num::Float(*x)),
            _ => None,
        }
    }
    fn value(self) -> Value {
        match self {
            Num::Int(n) => Value::Int(n),
            Num::Float(x) => Value::Float(x),
        }
    }
}

/// The shared name of a statistic (a result per window names each).
fn stat_name(s: Stat) -> std::sync::Arc<str> {
    use Stat::*;
    const ALL: [Stat; 11] = [Count, Sum, Mean, Min, Max, Stddev, First, Last, P50, P90, P99];
    static NAMES: std::sync::OnceLock<Vec<std::sync::Arc<str>>> = std::sync::OnceLock::new();
    let names = NAMES.get_or_init(|| ALL.iter().map(|s| std::sync::Arc::from(s.name())).collect());
    let at = match s {
        Count => 0,
        Sum => 1,
        Mean => 2,
        Min => 3,
        Max => 4,
        Stddev => 5,
        First => 6,
        Last => 7,
        P50 => 8,
        P90 => 9,
        P99 => 10,
    };
    names[at].clone()
}

/// All fields' statistics of one window.
#[derive(Clone, Debug)]
pub(crate) struct AggAcc {
    /// One per aggregated field, inline for one (the common case; a window
    /// of each of 100,000 keys may be open).
    fields: smallvec::SmallVec<[FieldAcc; 1]>,
}

fn wants_values(stats: &[Stat]) -> bool {
    stats.iter().any(|s| matches!(s, Stat::P50 | Stat::P90 | Stat::P99))
}

impl AggAcc {
    pub(crate) fn new(spec: &AggSpec) -> AggAcc {
        AggAcc {
            fields: spec
                .fields
                .iter()
                .map(|(_, stats)| FieldAcc {
                    values: wants_values(stats).then(Default::default),
                    variance: stats.contains(&Stat::Stddev),
                    ..FieldAcc::default()
                })
                .collect(),
        }
    }

    /// Fold in a value as `queued` keeps it: for one field, that field's
    /// value (`Null` when missing or not a number), else a dict of them.
    pub(crate) fn add_queued(&mut self, spec: &AggSpec, v: &Value) {
        match (&mut self.fields[..], v) {
            ([acc], Value::Int(n)) => acc.add(v, *n as f64),
            ([acc], Value::Float(x)) if x.is_finite() => acc.add(v, *x),
            ([_], _) => {}
            _ => self.add(spec, v),
        }
    }

    /// What of an item's value (a dict) `add_queued` needs, to keep while
    /// it waits for the watermark; the rest is handed back in `rest`.
    pub(crate) fn queued(spec: &AggSpec, v: Value, rest: &mut Option<Value>) -> Value {
        let Value::Map(mut fields) = v else {
            // Not a dict: nothing of it is aggregated.
            return if spec.fields.len() == 1 { Value::Null } else { v };
        };
        if let [(name, _)] = &spec.fields[..] {
            let x = match fields.iter_mut().find(|(n, _)| n == name) {
                Some((_, x @ (Value::Int(_) | Value::Float(_)))) => std::mem::replace(x, Value::Null),
                _ => Value::Null,
            };
            *rest = Some(Value::Map(fields));
            return x;
        }
        let read = |name: &std::sync::Arc<str>| spec.fields.iter().any(|(f, _)| f == name);
        let n = fields.iter().filter(|(name, _)| read(name)).count();
        if n == fields.len() {
            return Value::Map(fields);
        }
        let mut keep = Vec::with_capacity(n);
        for slot in fields.iter_mut().filter(|(name, _)| read(name)) {
            keep.push((slot.0.clone(), std::mem::replace(&mut slot.1, Value::Null)));
        }
        *rest = Some(Value::Map(fields));
        Value::Map(keep)
    }

    /// Fold one item's value (a dict) in. Fields that are missing or not
    /// finite numbers are left out.
    pub(crate) fn add(&mut self, spec: &AggSpec, item: &Value) {
        for ((name, _), acc) in spec.fields.iter().zip(self.fields.iter_mut()) {
            let Some(raw) = item.field(name) else {
                continue;
            };
            let x = match raw {
                Value::Int(n) => *n as f64,
                Value::Float(x) if x.is_finite() => *x,
                _ => continue,
            };
            acc.add(raw, x);
        }
    }

    pub(crate) fn merge(&mut self, newer: AggAcc) {
        for (a, b) in self.fields.iter_mut().zip(newer.fields) {
            a.merge(b);
        }
    }

    /// For the state file.
    pub(crate) fn encode(&self, e: &mut Enc) {
        e.u(self.fields.len() as u64);
        for f in &self.fields {
            e.u(f.count);
            for x in [f.sum, f.mean, f.m2, f.min, f.max] {
                e.f(x);
            }
            for v in [f.first, f.last] {
                match v {
                    Some(v) => {
                        e.b(true);
                        e.value(&v.value());
                    }
                    None => e.b(false),
                }
            }
            match &f.values {
                Some(xs) => {
                    e.b(true);
                    e.u(xs.len() as u64);
                    for x in xs.iter() {
                        e.f(*x);
                    }
                }
                None => e.b(false),
            }
            e.b(f.variance);
        }
    }

    /// The inverse of `encode`; the field count must match `spec`.
    pub(crate) fn decode(d: &mut Dec<'_>, spec: &AggSpec) -> DecResult<AggAcc> {
        let n = d.n()?;
        if n != spec.fields.len() {
            return Err(format!("{n} aggregated fields, the step has {}", spec.fields.len()));
        }
        let mut fields = smallvec::SmallVec::with_capacity(n);
        for _ in 0..n {
            let count = d.u()?;
            let (sum, mean, m2, min, max) = (d.f()?, d.f()?, d.f()?, d.f()?, d.f()?);
            let mut num = || -> DecResult<Option<Num>> {
                if !d.b()? {
                    return Ok(None);
                }
                match Num::of(&d.value()?) {
                    Some(n) => Ok(Some(n)),
                    None => Err("a first or last value that is not a number".into()),
                }
            };
            let first = num()?;
            let last = num()?;
            let values = if d.b()? {
                let k = d.n()?;
                Some((0..k).map(|_| d.f()).collect::<DecResult<Vec<f64>>>()?)
            } else {
                None
            };
            let variance = d.b()?;
            fields.push(FieldAcc {
                count,
                sum,
                mean,
                m2,
                min,
                max,
                first,
                last,
                values,
                variance,
            });
        }
        Ok(AggAcc { fields })
    }

    /// `{"temp": {"mean": ..., "max": ...}}` in the order the flow asked.
    pub(crate) fn result(&self, spec: &AggSpec) -> Value {
        Value::Map(
            spec.fields
                .iter()
                .zip(&self.fields)
                .map(|((name, stats), acc)| {
                    let m = stats.iter().map(|s| (stat_name(*s), acc.stat(*s))).collect();
                    (name.clone(), Value::Map(m))
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn spec(stats: &[Stat]) -> AggSpec {
        AggSpec {
            fields: vec![(Arc::from("t"), stats.to_vec())],
        }
    }

    fn item(x: Value) -> Value {
        Value::Map(vec![(Arc::from("t"), x)])
    }

    fn get(v: &Value, stat: &str) -> Value {
        v.field("t").unwrap().field(stat).unwrap().clone()
    }

    #[test]
    fn statistics_of_a_window_match_their_textbook_definitions() {
        let all = [
            Stat::Count,
            Stat::Sum,
            Stat::Mean,
            Stat::Min,
            Stat::Max,
            Stat::Stddev,
            Stat::First,
            Stat::Last,
            Stat::P50,
            Stat::P90,
        ];
        let s = spec(&all);
        let mut a = AggAcc::new(&s);
        for x in [4, 8, 2, 6] {
            a.add(&s, &item(Value::Int(x)));
        }
        a.add(&s, &item(Value::str("n/a")));
        a.add(&s, &Value::Map(vec![]));
        let r = a.result(&s);
        assert!(matches!(get(&r, "count"), Value::Int(4)));
        assert!(matches!(get(&r, "sum"), Value::Float(x) if x == 20.0));
        assert!(matches!(get(&r, "mean"), Value::Float(x) if x == 5.0));
        assert!(matches!(get(&r, "min"), Value::Float(x) if x == 2.0));
        assert!(matches!(get(&r, "max"), Value::Float(x) if x == 8.0));
        assert!(matches!(get(&r, "stddev"), Value::Float(x) if (x - 5f64.sqrt()).abs() < 1e-12));
        assert!(matches!(get(&r, "first"), Value::Int(4)));
        assert!(matches!(get(&r, "last"), Value::Int(6)));
        // nearest rank of [2, 4, 6, 8]: p50 -> 2nd value, p90 -> 4th.
        assert!(matches!(get(&r, "p50"), Value::Float(x) if x == 4.0));
        assert!(matches!(get(&r, "p90"), Value::Float(x) if x == 8.0));
    }

    #[test]
    fn a_field_without_values_reports_zero_count_and_nulls() {
        let s = spec(&[Stat::Count, Stat::Sum, Stat::Mean, Stat::P99, Stat::First]);
        let r = AggAcc::new(&s).result(&s);
        assert!(matches!(get(&r, "count"), Value::Int(0)));
        assert!(matches!(get(&r, "sum"), Value::Float(x) if x == 0.0));
        assert!(matches!(get(&r, "mean"), Value::Null));
        assert!(matches!(get(&r, "p99"), Value::Null));
        assert!(matches!(get(&r, "first"), Value::Null));
    }

    #[test]
    fn merging_sessions_equals_folding_everything_into_one() {
        let s = spec(&[Stat::Mean, Stat::Stddev, Stat::First, Stat::Last, Stat::P50]);
        let (mut a, mut b, mut whole) = (AggAcc::new(&s), AggAcc::new(&s), AggAcc::new(&s));
        for x in [1.5, 9.0, 3.25] {
            a.add(&s, &item(Value::Float(x)));
            whole.add(&s, &item(Value::Float(x)));
        }
        for x in [7.0, -2.0] {
            b.add(&s, &item(Value::Float(x)));
            whole.add(&s, &item(Value::Float(x)));
        }
        a.merge(b);
        let (m, w) = (a.result(&s), whole.result(&s));
        for stat in ["mean", "stddev", "p50", "first", "last"] {
            let (Value::Float(x), Value::Float(y)) = (get(&m, stat), get(&w, stat)) else {
                panic!("{stat} not a float")
            };
            assert!((x - y).abs() < 1e-12, "{stat}: {x} vs {y}");
        }
    }
}

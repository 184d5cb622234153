//! Topic filters as flows write them: MQTT's `+` and `#`, plus `{name}`
//! levels that match like `+` and hand the level's text to the flow as a
//! field (the device id in `sensors/{device}/temp`), so keying by a topic
//! segment needs no Python per message.

use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Level {
    Exact(String),
    /// `+` or `{name}`.
    One,
    /// `#`: this level and everything below.
    Rest,
}

/// One topic filter of a source.
#[derive(Clone, Debug)]
pub(crate) struct Filter {
    /// What is sent to the broker (`{name}` levels become `+`).
    pub subscribe: String,
    levels: Vec<Level>,
    /// (level index, field name) for each `{name}` level.
    fields: Vec<(usize, Arc<str>)>,
}

impl Filter {
    /// Parse a filter; the Python API validated it already, this says why
    /// not once more for filters from elsewhere.
    pub(crate) fn parse(text: &str) -> Result<Filter, String> {
        if text.is_empty() {
            return Err("an empty topic filter".into());
        }
        let parts: Vec<&str> = text.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        let mut fields = Vec::new();
        let mut subscribe = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            if p.len() > 2 && p.starts_with('{') && p.ends_with('}') {
                fields.push((i, Arc::from(&p[1..p.len() - 1])));
                levels.push(Level::One);
                subscribe.push("+");
            } else if *p == "+" {
                levels.push(Level::One);
                subscribe.push("+");
            } else if *p == "#" {
                if i + 1 != parts.len() {
                    return Err(format!("'#' must be the last level of {text:?}"));
                }
                levels.push(Level::Rest);
                subscribe.push("#");
            } else if p.contains(['+', '#', '{', '}']) {
                return Err(format!(
                    "{p:?} in {text:?}: wildcards and {{fields}} must be whole levels"
                ));
            } else {
                levels.push(Level::Exact(p.to_string()));
                subscribe.push(p);
            }
        }
        Ok(Filter {
            subscribe: subscribe.join("/"),
            levels,
            fields,
        })
    }

    /// Whether `topic` (a concrete topic) matches, by MQTT's rules: a
    /// wildcard in the first level does not match topics starting with `$`.
    pub(crate) fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$') && !matches!(self.levels.first(), Some(Level::Exact(_))) {
            return false;
        }
        let mut parts = topic.split('/');
        for level in &self.levels {
            match level {
                Level::Rest => return true,
                Level::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Level::Exact(e) => match parts.next() {
                    Some(p) if p == e => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }

    /// The `{name}` fields of a matching topic.
    pub(crate) fn fields<'t>(&self, topic: &'t str) -> Vec<(Arc<str>, &'t str)> {
        if self.fields.is_empty() {
            return Vec::new();
        }
        let parts: Vec<&str> = topic.split('/').collect();
        self.fields
            .iter()
            .filter_map(|(i, name)| parts.get(*i).map(|p| (name.clone(), *p)))
            .collect()
    }

    pub(crate) fn has_fields(&self) -> bool {
        !self.fields.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_as_in_mqtt() {
        let f = Filter::parse("sensors/+/temp").unwrap();
        assert_eq!(f.subscribe, "sensors/+/temp");
        assert!(f.matches("sensors/a1/temp"));
        assert!(f.matches("sensors//temp"));
        assert!(!f.matches("sensors/a1/temp/x"));
        assert!(!f.matches("sensors/a1"));
        let f = Filter::parse("sensors/#").unwrap();
        assert!(f.matches("sensors"));
        assert!(f.matches("sensors/a/b/c"));
        assert!(!f.matches("other/a"));
        let all = Filter::parse("#").unwrap();
        assert!(all.matches("a/b"));
        assert!(!all.matches("$SYS/broker/uptime"));
        assert!(Filter::parse("$SYS/#").unwrap().matches("$SYS/broker/uptime"));
        assert!(Filter::parse("a/#/b").is_err());
        assert!(Filter::parse("a/b+").is_err());
    }

    #[test]
    fn named_levels_subscribe_as_plus_and_yield_fields() {
        let f = Filter::parse("site/{site}/sensors/{device}/#").unwrap();
        assert_eq!(f.subscribe, "site/+/sensors/+/#");
        assert!(f.matches("site/north/sensors/d7/temp"));
        let got: Vec<(String, String)> = f
            .fields("site/north/sensors/d7/temp")
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            got,
            vec![("site".into(), "north".into()), ("device".into(), "d7".into())]
        );
    }
}

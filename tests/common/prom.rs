//! A strict parser of the Prometheus text exposition format (0.0.4), for tests: it refuses
//! whatever a Prometheus server would refuse or warn about, and the naming rules we hold
//! ourselves to (counters end in `_total`, histograms are cumulative and end at `+Inf`).

use std::collections::{BTreeMap, BTreeSet};

/// A parsed page: families by name, each with its type and samples.
#[derive(Debug, Default)]
pub struct Page {
    pub families: BTreeMap<String, Family>,
}

/// Label pairs of a sample, in the page's order.
pub type Labels = Vec<(String, String)>;

#[derive(Debug, Default)]
pub struct Family {
    pub kind: String,
    pub help: String,
    /// (sample name, labels in order, value).
    pub samples: Vec<(String, Labels, f64)>,
}

impl Page {
    /// The value of the sample `name` with exactly `labels`; panics if absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in the page"))
    }

    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.families
            .values()
            .flat_map(|f| &f.samples)
            .find_map(|(n, l, v)| {
                let same = n == name
                    && l.len() == labels.len()
                    && l.iter()
                        .zip(labels)
                        .all(|((a, b), (c, d))| a == c && b == d);
                same.then_some(*v)
            })
    }

    /// Every name a query could use: family names, and for histograms their `_bucket`,
    /// `_sum` and `_count` series.
    pub fn series_names(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for (name, family) in &self.families {
            names.insert(name.clone());
            for (sample, _, _) in &family.samples {
                names.insert(sample.clone());
            }
        }
        names
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => text
            .parse::<f64>()
            .map_err(|_| format!("bad value {text:?}")),
    }
}

/// Label set `{a="x",b="y"}` starting at `rest` (after the name); returns the labels and
/// what follows the closing brace.
fn parse_labels(rest: &str) -> Result<(Labels, &str), String> {
    let Some(mut rest) = rest.strip_prefix('{') else {
        return Ok((Vec::new(), rest));
    };
    let mut labels = Vec::new();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !valid_name(name) || name.starts_with("__") {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    other => return Err(format!("bad escape {other:?} in a label value")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if labels.iter().any(|(n, _): &(String, String)| n == name) {
            return Err(format!("label {name} twice"));
        }
        labels.push((name.to_string(), value));
        rest = &rest[end + 1..];
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("labels not separated by a comma".into());
        }
    }
}

/// Parses `text`; every problem is an error naming its line.
pub fn parse(text: &str) -> Result<Page, String> {
    let mut page = Page::default();
    let mut seen_series = BTreeSet::new();
    let mut current: Option<String> = None;
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the page does not end with a newline".into());
    }
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.is_empty() {
            return Err(at("empty line".into()));
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (keyword, name, rest) = (parts.next(), parts.next(), parts.next());
            match (keyword, name) {
                (Some("HELP"), Some(name)) => {
                    if !valid_name(name) {
                        return Err(at("bad metric name".into()));
                    }
                    let family = page.families.entry(name.to_string()).or_default();
                    if !family.help.is_empty() || !family.samples.is_empty() {
                        return Err(at("HELP after the family began or twice".into()));
                    }
                    family.help = rest.unwrap_or("").to_string();
                    current = Some(name.to_string());
                }
                (Some("TYPE"), Some(name)) => {
                    let kind = rest.unwrap_or("");
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(at(format!("unknown type {kind:?}")));
                    }
                    let family = page.families.entry(name.to_string()).or_default();
                    if !family.kind.is_empty() || !family.samples.is_empty() {
                        return Err(at("TYPE after samples or twice".into()));
                    }
                    if kind == "counter" && !name.ends_with("_total") {
                        return Err(at("a counter's name must end in _total".into()));
                    }
                    family.kind = kind.to_string();
                    current = Some(name.to_string());
                }
                _ => {} // other comments are allowed
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !valid_name(name) {
            return Err(at("bad metric name".into()));
        }
        let (labels, rest) = parse_labels(&line[name_end..]).map_err(at)?;
        let rest = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("no space before the value".into()))?;
        let mut fields = rest.split(' ');
        let value = parse_value(fields.next().unwrap_or("")).map_err(at)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| at("bad timestamp".into()))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        // The sample belongs to the family being written: its name, or a histogram's parts.
        let family_name = current
            .clone()
            .ok_or_else(|| at("a sample before any TYPE".into()))?;
        let family = page
            .families
            .get_mut(&family_name)
            .ok_or_else(|| at("no family".into()))?;
        let belongs = match family.kind.as_str() {
            "histogram" => [
                format!("{family_name}_bucket"),
                format!("{family_name}_sum"),
                format!("{family_name}_count"),
            ]
            .contains(&name.to_string()),
            "" => return Err(at("a sample of a family without TYPE".into())),
            _ => name == family_name,
        };
        if !belongs {
            return Err(at(format!("sample outside its family {family_name}")));
        }
        if family.kind == "counter" && (value.is_nan() || value < 0.0) {
            return Err(at("a negative or NaN counter".into()));
        }
        let mut key_labels = labels.clone();
        key_labels.sort();
        if !seen_series.insert((name.to_string(), key_labels)) {
            return Err(at("the same series twice".into()));
        }
        family.samples.push((name.to_string(), labels, value));
    }
    for (name, family) in &page.families {
        if family.kind.is_empty() {
            return Err(format!("{name}: HELP without TYPE"));
        }
        if family.kind == "histogram" {
            check_histogram(name, family)?;
        }
    }
    Ok(page)
}

/// Buckets cumulative and increasing in `le`, the last `+Inf`, equal to `_count`.
fn check_histogram(name: &str, family: &Family) -> Result<(), String> {
    let mut last_le = f64::NEG_INFINITY;
    let mut last_count = 0.0;
    let mut inf = None;
    let mut count = None;
    for (sample, labels, value) in &family.samples {
        if sample.ends_with("_bucket") {
            let le = labels
                .iter()
                .find(|(k, _)| k == "le")
                .ok_or(format!("{name}: a bucket without le"))?;
            let le = parse_value(&le.1)?;
            if le <= last_le || *value < last_count {
                return Err(format!("{name}: buckets not increasing or not cumulative"));
            }
            (last_le, last_count) = (le, *value);
            if le.is_infinite() {
                inf = Some(*value);
            }
        } else if sample.ends_with("_count") {
            count = Some(*value);
        }
    }
    match (inf, count) {
        (Some(i), Some(c)) if i == c => Ok(()),
        _ => Err(format!("{name}: no +Inf bucket, or it differs from _count")),
    }
}

/// GETs `/metrics` from a listener on this host and parses it strictly.
pub async fn scrape(http: &reqwest::Client, port: u16) -> Page {
    let text = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("body");
    parse(&text).unwrap_or_else(|e| panic!("{e}\n--- page ---\n{text}"))
}

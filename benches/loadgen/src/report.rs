//! A flat report: ordered key/value pairs printed as one JSON object or as text.

use std::fmt::Write;

pub enum V {
    S(String),
    U(u64),
    F(f64),
    Null,
}

#[derive(Default)]
pub struct Report(Vec<(&'static str, V)>);

impl Report {
    pub fn put(&mut self, key: &'static str, v: V) {
        self.0.push((key, v));
    }

    pub fn opt_f(&mut self, key: &'static str, v: Option<f64>) {
        self.put(key, v.map_or(V::Null, V::F));
    }

    pub fn json(&self) -> String {
        let mut out = String::from("{");
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "\"{k}\":");
            match v {
                V::S(s) => quote(&mut out, s),
                V::U(u) => {
                    let _ = write!(out, "{u}");
                }
                V::F(f) if f.is_finite() => {
                    let _ = write!(out, "{}", (f * 1000.0).round() / 1000.0);
                }
                V::F(_) | V::Null => out.push_str("null"),
            }
        }
        out.push('}');
        out
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.0 {
            let v = match v {
                V::S(s) => s.clone(),
                V::U(u) => u.to_string(),
                V::F(f) => format!("{f:.2}"),
                V::Null => "-".into(),
            };
            let _ = writeln!(out, "{k:>18}: {v}");
        }
        out
    }
}

fn quote(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escapes_and_nulls() {
        let mut r = Report::default();
        r.put("s", V::S("a\"b\\c\n".into()));
        r.put("u", V::U(7));
        r.put("f", V::F(1.23456));
        r.put("n", V::F(f64::NAN));
        r.opt_f("o", None);
        assert_eq!(
            r.json(),
            r#"{"s":"a\"b\\c\u000a","u":7,"f":1.235,"n":null,"o":null}"#
        );
    }
}

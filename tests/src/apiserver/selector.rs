//! Label selectors as lists and watches take them in `labelSelector`: equality-based
//! (`k=v`, `k==v`, `k!=v`) and set-based (`k in (a,b)`, `k notin (a,b)`, `k`, `!k`) terms,
//! comma-separated, all of which must hold. A malformed selector is an error the HTTP layer turns
//! into 400 BadRequest, as the API server does.

use std::collections::BTreeSet;

use serde_json::Value;

/// One requirement on a label.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    /// The label is present (with any value).
    Exists(String),
    /// The label is absent.
    Absent(String),
    /// The label is present with one of the values.
    In(String, BTreeSet<String>),
    /// The label is absent or has none of the values.
    NotIn(String, BTreeSet<String>),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(Vec<Term>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Not,
    Eq,
    NotEq,
    Open,
    Close,
    Comma,
}

fn word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')
}

fn tokens(s: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {}
            ',' => out.push(Token::Comma),
            '(' => out.push(Token::Open),
            ')' => out.push(Token::Close),
            '=' => {
                chars.next_if_eq(&'=');
                out.push(Token::Eq);
            }
            '!' if chars.next_if_eq(&'=').is_some() => out.push(Token::NotEq),
            '!' => out.push(Token::Not),
            c if word_char(c) => {
                let mut w = c.to_string();
                while let Some(c) = chars.next_if(|c| word_char(*c)) {
                    w.push(c);
                }
                out.push(Token::Word(w));
            }
            other => return Err(format!("unexpected character {other:?}")),
        }
    }
    Ok(out)
}

fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = key.rsplit_once('/').unwrap_or(("", key));
    let ok_name = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && !name.contains('/');
    if !ok_name || prefix.len() > 253 || prefix.contains('/') {
        return Err(format!("invalid label key {key:?}"));
    }
    Ok(())
}

fn check_value(value: &str) -> Result<(), String> {
    let ok = value.is_empty()
        || (value.len() <= 63
            && value.starts_with(|c: char| c.is_ascii_alphanumeric())
            && value.ends_with(|c: char| c.is_ascii_alphanumeric())
            && !value.contains('/'));
    if ok { Ok(()) } else { Err(format!("invalid label value {value:?}")) }
}

impl Selector {
    /// Parses a `labelSelector` query value.
    pub fn parse(s: &str) -> Result<Selector, String> {
        Self::parse_terms(s).map_err(|e| format!("unable to parse label selector {s:?}: {e}"))
    }

    fn parse_terms(s: &str) -> Result<Selector, String> {
        let toks = tokens(s)?;
        let mut terms = Vec::new();
        let mut i = 0;
        let word = |i: usize| match toks.get(i) {
            Some(Token::Word(w)) => Some(w.clone()),
            _ => None,
        };
        while i < toks.len() {
            let term = if toks[i] == Token::Not {
                let key = word(i + 1).ok_or("expected a label key after '!'")?;
                i += 2;
                check_key(&key)?;
                Term::Absent(key)
            } else {
                let key = word(i).ok_or("expected a label key")?;
                check_key(&key)?;
                i += 1;
                match toks.get(i) {
                    None | Some(Token::Comma) => Term::Exists(key),
                    Some(op @ (Token::Eq | Token::NotEq)) => {
                        // `k=` selects an empty value.
                        let value = word(i + 1).unwrap_or_default();
                        i += if value.is_empty() { 1 } else { 2 };
                        check_value(&value)?;
                        let set = BTreeSet::from([value]);
                        if *op == Token::Eq { Term::In(key, set) } else { Term::NotIn(key, set) }
                    }
                    Some(Token::Word(op)) if op == "in" || op == "notin" => {
                        let set_based = op == "in";
                        if toks.get(i + 1) != Some(&Token::Open) {
                            return Err(format!("expected '(' after {op:?}"));
                        }
                        i += 2;
                        let mut values = BTreeSet::new();
                        loop {
                            match toks.get(i) {
                                Some(Token::Word(v)) => {
                                    check_value(v)?;
                                    values.insert(v.clone());
                                    i += 1;
                                }
                                Some(Token::Comma) => i += 1,
                                Some(Token::Close) => {
                                    i += 1;
                                    break;
                                }
                                _ => return Err("missing ')' after the values".into()),
                            }
                        }
                        if values.is_empty() {
                            return Err(format!("{op:?} needs at least one value"));
                        }
                        if set_based { Term::In(key, values) } else { Term::NotIn(key, values) }
                    }
                    Some(other) => return Err(format!("unexpected {other:?} after label key {key:?}")),
                }
            };
            terms.push(term);
            match toks.get(i) {
                None => {}
                Some(Token::Comma) if i + 1 < toks.len() => i += 1,
                Some(other) => return Err(format!("expected ',' between terms, found {other:?}")),
            }
        }
        Ok(Selector(terms))
    }

    /// Whether an object's `metadata.labels` satisfy every term.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|t| match t {
            Term::Exists(k) => label(k).is_some(),
            Term::Absent(k) => label(k).is_none(),
            Term::In(k, set) => label(k).is_some_and(|v| set.contains(v)),
            Term::NotIn(k, set) => label(k).is_none_or(|v| !set.contains(v)),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn terms_select_as_kubernetes_does() {
        let web = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        let db = json!({"metadata": {"labels": {"app": "db"}}});
        let none = json!({"metadata": {}});
        // selector, matches web, db, none
        let cases = [
            ("", [true, true, true]),
            ("app=web", [true, false, false]),
            ("app==web", [true, false, false]),
            ("app!=web", [false, true, true]),
            ("tier", [true, false, false]),
            ("!tier", [false, true, true]),
            ("app in (web, db)", [true, true, false]),
            ("app in (web)", [true, false, false]),
            ("app notin (web)", [false, true, true]),
            ("app,!tier", [false, true, false]),
            ("app in (web,db),tier notin (back)", [true, true, false]),
            ("app=", [false, false, false]),
            ("example.com/app", [false, false, false]),
        ];
        for (sel, want) in cases {
            let s = Selector::parse(sel).unwrap();
            assert_eq!([s.matches(&web), s.matches(&db), s.matches(&none)], want, "{sel}");
        }
    }

    #[test]
    fn malformed_selectors_are_errors() {
        for bad in ["app in (web", "app in web", "app in ()", "=web", "app=web,", "a b", "app=we b", "app=-x", "app%"] {
            let err = Selector::parse(bad).unwrap_err();
            assert!(err.starts_with(&format!("unable to parse label selector {bad:?}")), "{bad}: {err}");
        }
    }
}

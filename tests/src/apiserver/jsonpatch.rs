//! RFC 6902 JSON Patch (`add`, `remove`, `replace`, `test`, `move`, `copy`), as kube-rs's
//! finalizer helper sends it to add and remove finalizers under a `test` precondition.

use serde_json::Value;

/// Why a patch cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// The patch is not a list of operations of known form.
    #[error("malformed JSON patch: {0}")]
    Malformed(String),
    /// A path names nothing (or a parent that does not exist).
    #[error("path {0} does not exist")]
    NoPath(String),
    /// A `test` operation failed.
    #[error("test of {0} failed")]
    TestFailed(String),
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// The parent container of `path` and the last token.
fn parent<'a>(doc: &'a mut Value, path: &str) -> Result<(&'a mut Value, String), PatchError> {
    let (head, last) = path.rsplit_once('/').ok_or_else(|| PatchError::Malformed(format!("path {path:?}")))?;
    let parent = if head.is_empty() { Some(doc) } else { doc.pointer_mut(head) };
    Ok((parent.ok_or_else(|| PatchError::NoPath(path.to_owned()))?, unescape(last)))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), PatchError> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = parent(doc, path)?;
    match parent {
        Value::Object(map) => {
            map.insert(last, value);
            Ok(())
        }
        Value::Array(items) => {
            let at = if last == "-" {
                items.len()
            } else {
                last.parse().map_err(|_| PatchError::NoPath(path.to_owned()))?
            };
            if at > items.len() {
                return Err(PatchError::NoPath(path.to_owned()));
            }
            items.insert(at, value);
            Ok(())
        }
        _ => Err(PatchError::NoPath(path.to_owned())),
    }
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, PatchError> {
    let (parent, last) = parent(doc, path)?;
    let removed = match parent {
        Value::Object(map) => map.remove(&last),
        Value::Array(items) => last.parse::<usize>().ok().filter(|&i| i < items.len()).map(|i| items.remove(i)),
        _ => None,
    };
    removed.ok_or_else(|| PatchError::NoPath(path.to_owned()))
}

/// Applies `patch` to `doc`, all or nothing.
pub fn apply(doc: &Value, patch: &Value) -> Result<Value, PatchError> {
    let ops = patch.as_array().ok_or_else(|| PatchError::Malformed("expected a list of operations".into()))?;
    let mut out = doc.clone();
    for op in ops {
        let field = |name: &str| op.get(name).and_then(Value::as_str).map(str::to_owned);
        let path = field("path").ok_or_else(|| PatchError::Malformed(format!("operation without a path: {op}")))?;
        let value = || op.get("value").cloned().ok_or_else(|| PatchError::Malformed(format!("{op} needs a value")));
        match field("op").as_deref() {
            Some("add") => add(&mut out, &path, value()?)?,
            Some("remove") => {
                remove(&mut out, &path)?;
            }
            Some("replace") => {
                remove(&mut out, &path)?;
                add(&mut out, &path, value()?)?;
            }
            Some("test") => {
                if out.pointer(&path) != Some(&value()?) {
                    return Err(PatchError::TestFailed(path));
                }
            }
            Some(op_name @ ("move" | "copy")) => {
                let from = field("from").ok_or_else(|| PatchError::Malformed(format!("{op} needs from")))?;
                let v = if op_name == "move" {
                    remove(&mut out, &from)?
                } else {
                    out.pointer(&from).cloned().ok_or(PatchError::NoPath(from))?
                };
                add(&mut out, &path, v)?;
            }
            other => return Err(PatchError::Malformed(format!("unknown op {other:?}"))),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn operations() {
        let doc = json!({"metadata": {"finalizers": ["a", "b"]}, "spec": {"x": 1}});
        let cases = [
            (json!([{"op": "add", "path": "/metadata/finalizers/-", "value": "c"}]), Ok(json!(["a", "b", "c"]))),
            (json!([{"op": "remove", "path": "/metadata/finalizers/0"}]), Ok(json!(["b"]))),
            (
                json!([{"op": "test", "path": "/metadata/finalizers", "value": ["a", "b"]}, {"op": "replace", "path": "/metadata/finalizers", "value": []}]),
                Ok(json!([])),
            ),
            (
                json!([{"op": "test", "path": "/metadata/finalizers", "value": ["z"]}]),
                Err(PatchError::TestFailed("/metadata/finalizers".into())),
            ),
            (json!([{"op": "remove", "path": "/metadata/nope/0"}]), Err(PatchError::NoPath("/metadata/nope/0".into()))),
            (json!({"op": "add"}), Err(PatchError::Malformed("expected a list of operations".into()))),
        ];
        for (patch, want) in cases {
            let got = apply(&doc, &patch).map(|d| d["metadata"]["finalizers"].clone());
            assert_eq!(got, want, "{patch}");
        }
        let moved = apply(&doc, &json!([{"op": "move", "from": "/spec/x", "path": "/spec/y"}])).unwrap();
        assert_eq!(moved["spec"], json!({"y": 1}));
    }
}

//! What the public API reads from a request before any work: query parameters, the headers that
//! steer a request (priority, deadline, caching, content type) and the profile-upload body.
//!
//! Pure functions of their input, so the fuzz target `http_inputs` drives exactly the code the
//! handlers run; every refusal is an [`ApiError`] a client can act on.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::HeaderMap;
use http::header::CONTENT_TYPE;
use serde::Deserialize;

use super::ApiError;
use crate::embed::{CacheMode, EmbedError, Priority, RequestOptions};
use crate::pdq::Pdq;
use crate::profiles::{Mode, Settings, Signal, check_id};

/// Most results a scan returns.
pub const MAX_TOP_K: usize = 100;
/// Results a scan returns when `top_k` is not given.
pub const DEFAULT_TOP_K: usize = 5;

/// The query parameters of one route, percent-decoded (`application/x-www-form-urlencoded`).
///
/// A parameter the route does not take, or one given twice, is refused: a misspelt `topk=3` that
/// was silently ignored would answer a question the client did not ask.
pub struct Query<'a> {
    pairs: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl<'a> Query<'a> {
    /// Parses `raw` (the part after `?`) for a route that takes the parameters in `accepted`.
    pub fn parse(raw: Option<&'a str>, accepted: &[&'static str]) -> Result<Query<'a>, ApiError> {
        let pairs: Vec<_> = form_urlencoded::parse(raw.unwrap_or("").as_bytes()).collect();
        for (i, (name, _)) in pairs.iter().enumerate() {
            let Some(&known) = accepted.iter().find(|a| **a == name.as_ref()) else {
                let message = match accepted {
                    [] => format!("{name:?} is not a parameter of this route, which takes none"),
                    _ => format!("{name:?} is not a parameter of this route; it takes {}", accepted.join(", ")),
                };
                return Err(ApiError::BadQuery { name: "query", message });
            };
            if pairs[..i].iter().any(|(earlier, _)| earlier == name) {
                return Err(ApiError::BadQuery { name: known, message: "given more than once".into() });
            }
        }
        Ok(Query { pairs })
    }

    /// The value of parameter `name`, if given.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_ref())
    }

    /// `profile`: required, a valid profile id.
    pub fn profile(&self) -> Result<String, ApiError> {
        let id = self.get("profile").filter(|id| !id.is_empty()).ok_or(ApiError::BadQuery {
            name: "profile",
            message: "required: POST /api/v1/match?profile=<id>".into(),
        })?;
        check_id(id)?;
        Ok(id.to_owned())
    }

    /// `top_k`: a whole number in `1..=MAX_TOP_K`, [`DEFAULT_TOP_K`] when absent.
    pub fn top_k(&self) -> Result<usize, ApiError> {
        let Some(v) = self.get("top_k") else { return Ok(DEFAULT_TOP_K) };
        v.parse::<usize>().ok().filter(|k| (1..=MAX_TOP_K).contains(k)).ok_or_else(|| ApiError::BadQuery {
            name: "top_k",
            message: format!("{v:?}: expected a whole number in 1..={MAX_TOP_K}"),
        })
    }

    /// `mode`: `robust` (the default) or `global`.
    pub fn mode(&self) -> Result<Mode, ApiError> {
        self.get("mode")
            .map_or(Ok(Mode::default()), |v| v.parse().map_err(|message| ApiError::BadQuery { name: "mode", message }))
    }

    /// `include=embeddings`: whether a profile is answered with its reference embeddings.
    pub fn include_embeddings(&self) -> Result<bool, ApiError> {
        match self.get("include") {
            None => Ok(false),
            Some("embeddings") => Ok(true),
            Some(v) => Err(ApiError::BadQuery { name: "include", message: format!("{v:?}: expected embeddings") }),
        }
    }
}

/// Reads `Cache-Control` request directives; `no-store` wins over `no-cache`, others are ignored
/// (as HTTP caches do with directives they do not implement).
pub fn cache_mode(value: Option<&str>) -> CacheMode {
    let directives = value.unwrap_or("").split(',').map(|d| d.trim().to_ascii_lowercase()).collect::<Vec<_>>();
    if directives.iter().any(|d| d == "no-store") {
        CacheMode::Bypass
    } else if directives.iter().any(|d| d == "no-cache" || d == "max-age=0") {
        CacheMode::Refresh
    } else {
        CacheMode::Use
    }
}

/// Priority, deadline and cache mode from the request headers. Without `X-Deadline-Ms` a request
/// gets `default_deadline`, at least `min_deadline`; a deadline of 0 is already past.
pub fn request_options(
    headers: &HeaderMap,
    default_deadline: Duration,
    min_deadline: Duration,
) -> Result<RequestOptions, ApiError> {
    let arrived = Instant::now();
    let header = |name: &'static str| -> Result<Option<&str>, ApiError> {
        headers
            .get(name)
            .map(|v| v.to_str().map_err(|_| ApiError::BadHeader { name, message: "not ASCII".into() }))
            .transpose()
    };
    let priority = match header("x-priority")?.map(|v| v.trim().to_ascii_lowercase()) {
        None => Priority::Normal,
        Some(v) if v == "high" => Priority::High,
        Some(v) if v == "normal" => Priority::Normal,
        Some(v) if v == "low" => Priority::Low,
        Some(v) => {
            return Err(ApiError::BadHeader {
                name: "X-Priority",
                message: format!("{v:?}: expected high, normal or low"),
            });
        }
    };
    let budget = match header("x-deadline-ms")? {
        None => default_deadline.max(min_deadline),
        Some(v) => v.trim().parse::<u64>().map(Duration::from_millis).map_err(|_| ApiError::BadHeader {
            name: "X-Deadline-Ms",
            message: format!("{v:?}: expected whole milliseconds"),
        })?,
    };
    if budget.is_zero() {
        return Err(EmbedError::DeadlineExceeded.into());
    }
    // A budget too large for the clock (e.g. u64::MAX ms) means "no deadline to speak of".
    let deadline = arrived.checked_add(budget).unwrap_or_else(|| arrived + Duration::from_secs(365 * 24 * 3600));
    let cache = cache_mode(header("cache-control")?);
    Ok(RequestOptions { priority, deadline, cache })
}

/// Refuses a body whose Content-Type starts with none of `accepted` (an absent one is accepted:
/// the body is checked for what it is anyway).
pub fn require_content_type(headers: &HeaderMap, accepted: &[&str], want: &'static str) -> Result<(), ApiError> {
    let Some(ct) = headers.get(CONTENT_TYPE) else { return Ok(()) };
    let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
    if accepted.iter().any(|a| ct.starts_with(a)) {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType { got: ct, want })
    }
}

/// Refuses a body that is declared as something other than an image (or raw bytes).
pub fn require_image(headers: &HeaderMap) -> Result<(), ApiError> {
    require_content_type(
        headers,
        &["image/", "application/octet-stream"],
        "an image (Content-Type: image/jpeg, image/png, ...)",
    )
}

/// A `PUT /api/v1/profiles/{id}` body, checked and decoded; nothing has been embedded yet.
pub struct ProfileUpload {
    /// The profile's own match threshold and PDQ distance, where it sets them.
    pub settings: Settings,
    /// Reference ids with what to embed (or the signal given), in upload order.
    pub references: Vec<(String, Source)>,
}

/// What one reference of an upload brings.
pub enum Source {
    /// Image bytes, decoded from base64, still to be embedded.
    Image(Bytes),
    /// An embedding computed elsewhere with the same model, or a PDQ hash from a hash list.
    Given(Signal),
}

/// Body of `PUT /api/v1/profiles/{id}`, as sent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileBody {
    #[serde(default)]
    threshold: Option<f32>,
    #[serde(default)]
    pdq_distance: Option<u32>,
    references: Vec<ReferenceBody>,
}

/// One reference: an image (base64), an embedding computed elsewhere with the same model, or a
/// PDQ hash (hex, as hash lists carry it) with its quality if the list gives one.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReferenceBody {
    id: String,
    #[serde(default)]
    image_b64: Option<String>,
    #[serde(default)]
    embedding: Option<Vec<f32>>,
    #[serde(default)]
    pdq: Option<String>,
    #[serde(default)]
    quality: Option<u8>,
}

impl ProfileUpload {
    /// Parses and decodes the body; what the profile store checks (ids, counts, dimensions) is
    /// left to it, so there is one judge of a valid profile.
    pub fn parse(body: &[u8]) -> Result<ProfileUpload, ApiError> {
        let body: ProfileBody = serde_json::from_slice(body).map_err(json_error)?;
        let mut references = Vec::with_capacity(body.references.len());
        for (i, r) in body.references.into_iter().enumerate() {
            let invalid = |msg: String| ApiError::InReference(i, Box::new(ApiError::Unprocessable(msg)));
            if r.quality.is_some() && r.pdq.is_none() {
                return Err(invalid("quality is the quality of a pdq hash; give it with pdq".to_owned()));
            }
            let source = match (r.image_b64, r.embedding, r.pdq) {
                (Some(b64), None, None) => base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map(|b| Source::Image(Bytes::from(b)))
                    .map_err(|e| ApiError::BadBase64 {
                        field: format!("references[{i}].image_b64"),
                        message: e.to_string(),
                    })?,
                (None, Some(embedding), None) => Source::Given(Signal::Embedding(embedding)),
                (None, None, Some(hex)) => {
                    let hash = Pdq::from_hex(&hex).map_err(|e| invalid(format!("pdq: {e}")))?;
                    Source::Given(Signal::Pdq(hash, r.quality))
                }
                _ => return Err(invalid("give exactly one of image_b64, embedding or pdq".to_owned())),
            };
            references.push((r.id, source));
        }
        let settings = Settings { threshold: body.threshold, pdq_distance: body.pdq_distance };
        Ok(ProfileUpload { settings, references })
    }
}

/// Syntax errors are 400; well-formed JSON with the wrong content is 422.
pub fn json_error(e: serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => ApiError::Unprocessable(e.to_string()),
        _ => ApiError::BadJson(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    /// (query, accepted parameters, outcome: the profile id or the status and error code).
    type QueryCase = (&'static str, &'static [&'static str], Result<&'static str, (StatusCode, &'static str)>);

    #[test]
    fn queries_are_decoded_and_strict() {
        let cases: &[QueryCase] = &[
            ("profile=cats", &["profile"], Ok("cats")),
            ("profile=ca%74s", &["profile"], Ok("cats")),
            ("profile=", &["profile"], Err((StatusCode::BAD_REQUEST, "invalid_query"))),
            ("", &["profile"], Err((StatusCode::BAD_REQUEST, "invalid_query"))),
            ("profile=..secret", &["profile"], Err((StatusCode::BAD_REQUEST, "invalid_profile_id"))),
            ("profile=a%2Fb", &["profile"], Err((StatusCode::BAD_REQUEST, "invalid_profile_id"))),
            ("profile=a&profile=b", &["profile"], Err((StatusCode::BAD_REQUEST, "invalid_query"))),
            ("profil=cats", &["profile"], Err((StatusCode::BAD_REQUEST, "invalid_query"))),
            ("profile=cats&x=1", &["profile"], Err((StatusCode::BAD_REQUEST, "invalid_query"))),
        ];
        for (raw, accepted, want) in cases {
            let got = Query::parse(Some(raw), accepted).and_then(|q| q.profile());
            match (got, want) {
                (Ok(id), Ok(w)) => assert_eq!(id, *w, "{raw}"),
                (Err(e), Err((status, code))) => assert_eq!(e.status_code(), (*status, *code), "{raw}: {e}"),
                (got, want) => panic!("{raw}: got {:?}, want {want:?}", got.map_err(|e| e.to_string())),
            }
        }
    }

    #[test]
    fn top_k_and_include_take_only_their_values() {
        let top_k = |raw: &str| Query::parse(Some(raw), &["top_k"]).and_then(|q| q.top_k()).ok();
        assert_eq!(top_k(""), Some(DEFAULT_TOP_K));
        assert_eq!(top_k("top_k=1"), Some(1));
        assert_eq!(top_k("top_k=100"), Some(100));
        for bad in ["top_k=0", "top_k=101", "top_k=-1", "top_k=3.5", "top_k=", "top_k=1&top_k=2"] {
            assert_eq!(top_k(bad), None, "{bad}");
        }
        let include = |raw: &str| Query::parse(Some(raw), &["include"]).and_then(|q| q.include_embeddings()).ok();
        assert_eq!(include(""), Some(false));
        assert_eq!(include("include=embeddings"), Some(true));
        assert_eq!(include("include=all"), None);
        assert!(Query::parse(Some("a=1"), &[]).is_err(), "a route without parameters refuses one");
        let mode = |raw: &str| Query::parse(Some(raw), &["mode"]).and_then(|q| q.mode()).ok();
        assert_eq!(mode(""), Some(Mode::Robust));
        assert_eq!(mode("mode=global"), Some(Mode::Global));
        assert_eq!(mode("mode=robust"), Some(Mode::Robust));
        assert_eq!(mode("mode=Global"), None);
        assert_eq!(mode("mode=regional"), None);
    }

    #[test]
    fn huge_deadlines_are_capped_and_zero_is_past() {
        let mut headers = HeaderMap::new();
        headers.insert("x-deadline-ms", u64::MAX.to_string().parse().unwrap());
        let opts = request_options(&headers, Duration::from_secs(2), Duration::ZERO).unwrap();
        assert!(opts.deadline > Instant::now() + Duration::from_secs(3600));
        headers.insert("x-deadline-ms", "0".parse().unwrap());
        let e = request_options(&headers, Duration::from_secs(2), Duration::ZERO).err().unwrap();
        assert_eq!(e.status_code().1, "deadline_exceeded");
    }

    #[test]
    fn profile_uploads_name_the_bad_reference() {
        let cases: &[(&str, Result<usize, &str>)] = &[
            (r#"{"references":[{"id":"a","embedding":[1,0]}]}"#, Ok(1)),
            (r#"{"references":[{"id":"a","image_b64":"aGk="},{"id":"b","embedding":[1]}]}"#, Ok(2)),
            (r#"{"references":[{"id":"a"}]}"#, Err("references[0]: give exactly one of image_b64, embedding or pdq")),
            (
                r#"{"references":[{"id":"a","pdq":"00ff"}]}"#,
                Err("references[0]: pdq: a PDQ hash is 64 hex digits, got 4"),
            ),
            (r#"{"references":[{"id":"a","embedding":[1],"pdq":"0"}]}"#, Err("give exactly one of")),
            (r#"{"references":[{"id":"a","embedding":[1],"quality":90}]}"#, Err("give it with pdq")),
            (r#"{"references":[{"id":"a","pdq":"0","quality":300}]}"#, Err("expected u8")),
            (
                r#"{"references":[{"id":"a","embedding":[1]},{"id":"b","image_b64":"!"}]}"#,
                Err("references[1].image_b64"),
            ),
            (r#"{"references":[],"extra":1}"#, Err("unknown field `extra`")),
            (r#"{"references":["#, Err("invalid JSON")),
        ];
        for (body, want) in cases {
            match (ProfileUpload::parse(body.as_bytes()), want) {
                (Ok(up), Ok(n)) => assert_eq!(up.references.len(), *n, "{body}"),
                (Err(e), Err(fragment)) => assert!(e.to_string().contains(fragment), "{body}: {e}"),
                (got, want) => panic!("{body}: got {:?}, want {want:?}", got.err().map(|e| e.to_string())),
            }
        }
    }
}

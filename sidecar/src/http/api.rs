//! The public API: embedding, matching, scanning, profiles, probes and reports.
//!
//! Handlers parse and check everything they can before any inference runs (unknown profile, bad
//! headers, a deadline already past), so a bad request never costs model time. Embedding itself
//! is the request pipeline's (`crate::embed`); this module only turns requests into its inputs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use inferpool_crds::wire;
use serde_json::json;

use super::parse::{Query, request_options, require_image};
use super::profiles;
use super::{ApiError, Resp, Routed, blocking, discard_body, json, read_body, text};
use crate::app::App;
use crate::embed::{EmbedError, Outcome, RequestOptions};
use crate::keypoints::{self, Keypoints};
use crate::matcher;
use crate::metrics::Route;
use crate::pdq::{self, Pdq};
use crate::preprocess::{JpegDecode, Preprocessor};
use crate::profiles::{Probe, Profile, ProfileError, Rules, SignalKind, Verdict};
use crate::report;

/// The route a path on the public listener belongs to.
pub fn route_of(path: &str) -> Route {
    match path {
        p if p.starts_with(wire::PROFILES_PREFIX) => Route::Profiles,
        wire::EMBED => Route::Embed,
        wire::MATCH => Route::Match,
        wire::SCAN => Route::Scan,
        wire::HASH => Route::Hash,
        wire::HEALTHZ | wire::READYZ | wire::HEALTH => Route::Probes,
        wire::METRICS => Route::Metrics,
        wire::SLA_REPORT | wire::PERFORMANCE_REPORT | wire::AI_INFERENCE_REPORT => Route::Reports,
        _ => Route::Unknown,
    }
}

/// Dispatches a request on the public listener.
pub async fn route(app: &Arc<App>, req: Request<Incoming>) -> Routed {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    if let Some(id) = path.strip_prefix(wire::PROFILES_PREFIX) {
        let id = id.to_owned();
        let result = match method {
            Method::PUT => profiles::put(app, &id, req).await,
            Method::GET => profiles::get(app, &id, req.uri().query()).await,
            Method::DELETE => profiles::delete(app, &id, req.uri().query()).await,
            m => Err(ApiError::MethodNotAllowed(m.to_string())),
        };
        return (Route::Profiles, result);
    }
    let route = route_of(&path);
    if route == Route::Unknown {
        return (route, Err(ApiError::NotFound(path)));
    }
    let wanted = if route.takes_image() { Method::POST } else { Method::GET };
    if method != wanted {
        return (route, Err(ApiError::MethodNotAllowed(method.to_string())));
    }
    let result = match path.as_str() {
        wire::EMBED => embed(app, req).await,
        wire::MATCH => match_profile(app, req).await,
        wire::SCAN => scan(app, req).await,
        wire::HASH => hash(app, req).await,
        wire::HEALTHZ => Ok(json(StatusCode::OK, &json!({"status": "ok"}))),
        wire::READYZ => readiness(app),
        wire::HEALTH => Ok(health(app)),
        wire::METRICS => Ok(metrics_text(app)),
        wire::SLA_REPORT => Ok(json(StatusCode::OK, &report::sla(app))),
        wire::PERFORMANCE_REPORT => Ok(json(StatusCode::OK, &report::performance(app))),
        _ => Ok(json(StatusCode::OK, &report::ai_inference(app))),
    };
    (route, result)
}

/// 200 once the model is loaded and warmed, 503 before and while draining.
pub fn readiness(app: &App) -> Result<Resp, ApiError> {
    if app.is_ready() { Ok(json(StatusCode::OK, &json!({"status": "ready"}))) } else { Err(ApiError::NotReady) }
}

/// The health report: 503 while the sidecar should get no requests, 200 otherwise.
fn health(app: &App) -> Resp {
    let (overall, body) = report::health(app);
    let status = if overall == report::Health::Unhealthy { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    json(status, &body)
}

/// Prometheus text exposition.
pub fn metrics_text(app: &App) -> Resp {
    app.cache.refresh_gauges();
    app.metrics.resident_memory.set(i64::try_from(report::rss_bytes()).unwrap_or(i64::MAX));
    text(StatusCode::OK, "text/plain; version=0.0.4", app.metrics.encode())
}

/// The embedding of an image, through the request pipeline of the loaded model.
pub(super) async fn embed_image(app: &App, bytes: Bytes, opts: &RequestOptions) -> Result<Outcome, ApiError> {
    let pipeline = app.pipeline().ok_or(ApiError::NotReady)?;
    Ok(pipeline.embed(bytes, opts).await?)
}

/// Checks headers, reads the image body and embeds it.
async fn embed_request(app: &Arc<App>, req: Request<Incoming>) -> Result<(Outcome, Instant), ApiError> {
    let (body, opts, started) = image_request(app, req).await?;
    Ok((embed_image(app, body, &opts).await?, started))
}

/// Checks headers and admission, then reads the image body: (body, options, when it started).
async fn image_request(app: &Arc<App>, req: Request<Incoming>) -> Result<(Bytes, RequestOptions, Instant), ApiError> {
    let started = Instant::now();
    if !app.serves() {
        return Err(ApiError::NotReady);
    }
    require_image(req.headers())?;
    let opts = request_options(req.headers(), app.config.default_deadline, Duration::ZERO)?;
    if let Err(e) = app.pipeline().map_or(Ok(()), |p| p.admit_early(&opts)) {
        // Refused before the body was read: read it off the connection unseen, so the client
        // gets the answer on a connection that stays usable.
        // (Answering without reading it made hyper reset the connection under the client, which
        // then saw an error instead of the 429 for about one refusal in six.)
        discard_body(req, app.config.max_body_bytes).await;
        return Err(e.into());
    }
    let body = read_body(req, app.config.max_body_bytes).await?;
    Ok((body, opts, started))
}

/// An f32 as the f64 with the same shortest decimal form (0.6, not 0.6000000238418579).
pub(super) fn num(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::NAN)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Body of a `POST /api/v1/embed` answer. A typed struct rather than `json!`: building a
/// `serde_json::Value` of 1280 numbers first doubled the cost of answering a cache hit.
#[derive(serde::Serialize)]
struct EmbedAnswer<'a> {
    embedding: &'a [f32],
    dim: usize,
    model: &'a str,
    cache: &'static str,
    timing_ms: Timing,
}

#[derive(serde::Serialize)]
struct Timing {
    queue: f64,
    inference: f64,
    total: f64,
}

async fn embed(app: &Arc<App>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    Query::parse(req.uri().query(), &[])?;
    let (e, started) = embed_request(app, req).await?;
    let answer = EmbedAnswer {
        embedding: &e.embedding,
        dim: e.embedding.len(),
        model: &app.card.card.name,
        cache: e.cache,
        timing_ms: Timing { queue: ms(e.queue_wait), inference: ms(e.inference), total: ms(started.elapsed()) },
    };
    Ok(json(StatusCode::OK, &answer))
}

/// `POST /api/v1/hash`: the PDQ hash of the image at full resolution (as partners' hash lists
/// are made), its quality, and whether that quality is enough to match on. CPU only, no model.
async fn hash(app: &Arc<App>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    Query::parse(req.uri().query(), &[])?;
    require_image(req.headers())?;
    let body = read_body(req, app.config.max_body_bytes).await?;
    let (hash, quality) = pdq_of(app, body).await?;
    Ok(json(
        StatusCode::OK,
        &json!({"pdq": hash.to_string(), "quality": quality, "usable": quality >= pdq::MIN_MATCH_QUALITY}),
    ))
}

/// The PDQ hash and quality of an image decoded at full resolution, as partners' lists are made.
async fn pdq_of(app: &App, body: Bytes) -> Result<(Pdq, u8), ApiError> {
    let full = app.preprocessor.as_ref().clone().with_jpeg_decode(JpegDecode::Full);
    decoded(full, body, |width, height, rgb| {
        Pdq::of_rgb(width, height, rgb).ok_or(ApiError::ImageTooSmall { width, height })
    })
    .await
}

/// The keypoints of an image (none for one too small or too flat to have any). A large JPEG is
/// decoded at the smallest DCT scale that keeps both sides at 5/8 of [`keypoints::LONG_SIDE`]
/// (320 pixels) or more, so its long side is still at least 512 for any aspect ratio up to 1.6:
/// a 1600x1000 photo decodes at half size, a 12-megapixel one at an eighth (with
/// `--jpeg-decode full`, always at full size).
pub(super) async fn keypoints_of(app: &App, body: Bytes) -> Result<Keypoints, ApiError> {
    let side = keypoints::LONG_SIDE * 5 / 8;
    let input = crate::model::InputSpec { width: side, height: side, ..app.card.card.input.clone() };
    let decoder = Preprocessor::new(input, app.config.max_pixels).with_jpeg_decode(app.config.jpeg_decode);
    decoded(decoder, body, |width, height, rgb| Ok(Keypoints::of_rgb(width, height, rgb))).await
}

/// Runs `f` on the image as `decoder` decodes it, on the blocking pool.
async fn decoded<T: Send + 'static>(
    decoder: Preprocessor,
    body: Bytes,
    f: impl FnOnce(u32, u32, &[u8]) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    blocking(move || {
        let (width, height, rgb) = decoder.decode_upright(&body).map_err(|e| ApiError::Embed(EmbedError::Image(e)))?;
        f(width, height, &rgb)
    })
    .await?
}

/// A profile by id; one this replica has not seen yet is looked for among the pool's shared ones.
pub(super) async fn find_profile(app: &App, id: &str) -> Result<Arc<Profile>, ApiError> {
    match (app.profiles.get(id), &app.profile_sync) {
        (Err(ProfileError::NotFound(_)), Some(sync)) => {
            if let Err(e) = sync.pull().await {
                tracing::debug!(error = %e, "shared profiles unavailable");
            }
            Ok(app.profiles.get(id)?)
        }
        (found, _) => Ok(found?),
    }
}

/// A profile that may be matched against: it exists and was made by the model now served.
async fn usable_profile(app: &App, id: &str) -> Result<Arc<Profile>, ApiError> {
    let profile = find_profile(app, id).await?;
    if profile.is_stale(&app.fingerprint) {
        return Err(ApiError::StaleProfile(id.to_owned()));
    }
    Ok(profile)
}

/// A unit-length copy of the embedding, for cosine scores.
fn unit(mut v: Vec<f32>) -> Result<Vec<f32>, ApiError> {
    if matcher::normalize(&mut v) {
        Ok(v)
    } else {
        Err(ApiError::Internal("the model returned a zero or non-finite embedding".into()))
    }
}

/// Which signals of an image a set of profiles needs.
#[derive(Debug, Clone, Copy)]
struct Needs {
    embedding: bool,
    pdq: bool,
}

impl Needs {
    /// An embedding when a profile has embedding references (or none has anything else, so a
    /// scan of no profiles still answers as an embedding would), a hash when one has PDQ hashes.
    fn of<'a>(profiles: impl Iterator<Item = &'a Profile> + Clone) -> Needs {
        let pdq = profiles.clone().any(Profile::has_pdq);
        Needs { embedding: !pdq || profiles.clone().any(Profile::has_embeddings), pdq }
    }
}

/// An image examined for matching: what the profiles need of it, computed side by side, and the
/// image itself for keypoints when a verdict asks for them.
struct Examined {
    body: Bytes,
    embedding: Option<Vec<f32>>,
    pdq: Option<(Pdq, u8)>,
    keypoints: Option<Keypoints>,
    cache: Option<&'static str>,
    started: Instant,
}

impl Examined {
    fn probe(&self) -> Probe<'_> {
        Probe { embedding: self.embedding.as_deref(), pdq: self.pdq, keypoints: self.keypoints.as_ref() }
    }

    /// Judges the image against `profiles`; when some verdict needs the image's keypoints, they
    /// are computed (once, for all the profiles) and only those profiles are judged again.
    async fn judge<'p>(
        &mut self,
        app: &App,
        profiles: &[&'p Profile],
        rules: &Rules,
    ) -> Result<Vec<Verdict<'p>>, ApiError> {
        let mut verdicts: Vec<Verdict<'p>> = profiles.iter().map(|p| p.judge(&self.probe(), rules)).collect();
        if !verdicts.iter().any(|v| v.needs_keypoints) {
            return Ok(verdicts);
        }
        self.keypoints = Some(keypoints_of(app, self.body.clone()).await?);
        for (verdict, profile) in verdicts.iter_mut().zip(profiles).filter(|(v, _)| v.needs_keypoints) {
            *verdict = profile.judge(&self.probe(), rules);
        }
        Ok(verdicts)
    }
}

/// The matching rules of a request.
fn rules(app: &App, query: &Query<'_>) -> Result<Rules, ApiError> {
    let card = &app.card.card;
    Ok(Rules { threshold: card.match_threshold, verification: card.verification, mode: query.mode()? })
}

async fn examine(app: &Arc<App>, req: Request<Incoming>, needs: Needs) -> Result<Examined, ApiError> {
    let (body, opts, started) = image_request(app, req).await?;
    let embedding = async {
        if !needs.embedding {
            return Ok(None);
        }
        let e = embed_image(app, body.clone(), &opts).await?;
        Ok::<_, ApiError>(Some((unit(e.embedding.to_vec())?, e.cache)))
    };
    let hash = async {
        match needs.pdq {
            false => Ok(None),
            // Too small to hash is no error here: the embedding may still match.
            true => match pdq_of(app, body.clone()).await {
                Ok(h) => Ok(Some(h)),
                Err(ApiError::ImageTooSmall { .. }) => Ok(None),
                Err(e) => Err(e),
            },
        }
    };
    let (embedding, pdq) = tokio::try_join!(embedding, hash)?;
    let cache = embedding.as_ref().map(|e| e.1);
    Ok(Examined { body, embedding: embedding.map(|e| e.0), pdq, keypoints: None, cache, started })
}

async fn match_profile(app: &Arc<App>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let query = Query::parse(req.uri().query(), &["profile", "mode"])?;
    let (id, rules) = (query.profile()?, rules(app, &query)?);
    let profile = usable_profile(app, &id).await?;
    let mut seen = examine(app, req, Needs::of(std::iter::once(profile.as_ref()))).await?;
    let v = seen.judge(app, &[profile.as_ref()], &rules).await?.remove(0);
    Ok(json(
        StatusCode::OK,
        &json!({
            "profile": id,
            "matched": v.signal.is_some(),
            "signal": v.signal,
            "score": v.score.map(num),
            "distance": v.distance,
            "inliers": v.inliers,
            "reference": v.reference,
            "threshold": num(profile.threshold.unwrap_or(rules.threshold)),
            "pdq_distance": profile.pdq_distance(),
            "mode": rules.mode,
            "cache": seen.cache,
            "latency_ms": ms(seen.started.elapsed()),
        }),
    ))
}

async fn scan(app: &Arc<App>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let query = Query::parse(req.uri().query(), &["top_k", "mode"])?;
    let (top_k, rules) = (query.top_k()?, rules(app, &query)?);
    let profiles = app.profiles.all();
    let usable: Vec<&Profile> = profiles.iter().map(Arc::as_ref).filter(|p| !p.is_stale(&app.fingerprint)).collect();
    let mut seen = examine(app, req, Needs::of(usable.iter().copied())).await?;
    let verdicts = seen.judge(app, &usable, &rules).await?;
    let mut matches: Vec<_> = usable
        .iter()
        .zip(verdicts)
        .filter_map(|(p, v)| {
            // One order for every signal: the cosine, or for PDQ 1 - distance/128 (1 for the same
            // hash, 0 for unrelated ones, whose hashes differ in about half their 256 bits).
            let rank = match v.signal? {
                SignalKind::Embedding | SignalKind::Keypoints => v.score?,
                SignalKind::Pdq => 1.0 - v.distance? as f32 / 128.0,
            };
            let threshold = num(p.threshold.unwrap_or(rules.threshold));
            Some((
                rank,
                json!({"profile": p.id, "reference": v.reference, "signal": v.signal, "score": v.score.map(num),
                       "distance": v.distance, "inliers": v.inliers, "threshold": threshold,
                       "pdq_distance": p.pdq_distance()}),
            ))
        })
        .collect();
    matches.sort_by(|a, b| b.0.total_cmp(&a.0));
    matches.truncate(top_k);
    Ok(json(
        StatusCode::OK,
        &json!({
            "matches": matches.into_iter().map(|(_, m)| m).collect::<Vec<_>>(),
            "profiles_checked": profiles.len(),
            "mode": rules.mode,
            "cache": seen.cache,
            "latency_ms": ms(seen.started.elapsed()),
        }),
    ))
}

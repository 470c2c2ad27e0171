//! The profile routes: `PUT`, `GET` and `DELETE /api/v1/profiles/{id}`.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::api::{embed_image, find_profile, keypoints_of, num};
use super::parse::{ProfileUpload, Query, Source, request_options, require_content_type};
use super::{ApiError, Resp, blocking, json, read_body};
use crate::app::App;
use crate::profiles::Signal;

/// Shortest deadline a profile upload gets: it may embed many images.
const PROFILE_UPLOAD_DEADLINE: Duration = Duration::from_secs(30);

pub(super) async fn put(app: &Arc<App>, id: &str, req: Request<Incoming>) -> Result<Resp, ApiError> {
    crate::profiles::check_id(id)?;
    require_content_type(req.headers(), &["application/json"], "application/json")?;
    Query::parse(req.uri().query(), &[])?;
    let opts = request_options(req.headers(), app.config.default_deadline, PROFILE_UPLOAD_DEADLINE)?;
    let body = read_body(req, app.config.max_body_bytes).await?;
    // Decode everything first so a bad reference costs no inference.
    let ProfileUpload { settings, references: pending } = ProfileUpload::parse(&body)?;
    // Images of one upload are queued together, so they run as one batch.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (_, source)) in pending.iter().enumerate() {
        if let Source::Image(bytes) = source {
            let (app, bytes) = (Arc::clone(app), bytes.clone());
            tasks.spawn(async move {
                let embedded =
                    async { Ok::<_, ApiError>(embed_image(&app, bytes.clone(), &opts).await?.embedding.to_vec()) };
                (i, tokio::try_join!(embedded, keypoints_of(&app, bytes.clone())))
            });
        }
    }
    let mut seen = vec![None; pending.len()];
    while let Some(joined) = tasks.join_next().await {
        let (i, result) = joined.map_err(|e| ApiError::Internal(e.to_string()))?;
        seen[i] = Some(result.map_err(|e| ApiError::InReference(i, Box::new(e)))?);
    }
    let refs = pending
        .into_iter()
        .zip(seen)
        .map(|((rid, source), seen)| match (source, seen) {
            (Source::Given(signal), _) => Ok((rid, signal)),
            (Source::Image(_), Some((embedding, keypoints))) => Ok((rid, Signal::Image(embedding, keypoints))),
            (Source::Image(_), None) => Err(ApiError::Internal(format!("reference {rid:?} was not embedded"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (profile, created) = blocking({
        let app = Arc::clone(app);
        let id = id.to_owned();
        move || app.profiles.put(&id, settings, refs)
    })
    .await??;
    let shared = match &app.profile_sync {
        None => false,
        Some(sync) => sync
            .publish(&profile)
            .await
            .inspect_err(|e| tracing::warn!(id, error = %e, "profile kept locally only; published on the next sync"))
            .is_ok(),
    };
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok(json(
        status,
        &json!({"id": profile.id, "references": profile.references.len(), "version": profile.version, "shared": shared}),
    ))
}

pub(super) async fn get(app: &App, id: &str, query: Option<&str>) -> Result<Resp, ApiError> {
    let with_embeddings = Query::parse(query, &["include"])?.include_embeddings()?;
    let p = find_profile(app, id).await?;
    let references: Vec<_> = p
        .references
        .iter()
        .map(|r| {
            let mut out = json!({"id": r.id});
            if let Some(hash) = &r.pdq {
                out["pdq"] = json!(hash.to_string());
                out["quality"] = json!(r.quality);
            }
            if let Some(k) = &r.keypoints {
                out["keypoints"] = json!(k.len());
            }
            if with_embeddings && !r.embedding.is_empty() {
                out["embedding"] = json!(r.embedding);
            }
            out
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &json!({
            "id": p.id,
            "threshold": num(p.threshold.unwrap_or(app.card.card.match_threshold)),
            "pdq_distance": p.pdq_distance(),
            "references": references,
            "version": p.version,
            "model": p.model,
            "stale": p.is_stale(&app.fingerprint),
            "without_keypoints": p.without_keypoints(),
            "updated_at": p.updated_at,
        }),
    ))
}

pub(super) async fn delete(app: &App, id: &str, query: Option<&str>) -> Result<Resp, ApiError> {
    crate::profiles::check_id(id)?;
    Query::parse(query, &[])?;
    find_profile(app, id).await?;
    let store = Arc::clone(&app.profiles);
    let owned = id.to_owned();
    blocking(move || store.delete(&owned)).await??;
    if let Some(sync) = &app.profile_sync
        && let Err(e) = sync.publish_delete(id).await
    {
        tracing::warn!(id, error = %e, "profile deleted locally only; other replicas keep it until Redis is back");
    }
    Ok(json(StatusCode::OK, &json!({"id": id, "deleted": true})))
}

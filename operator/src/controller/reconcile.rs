//! One reconcile of one pool: validate -> dereference -> build -> apply -> update_status.
//!
//! `validate` and `build` are pure. The children and pods come from the reflector stores, so the
//! only requests are the writes that change something (and a look at the admin Secret, see
//! [`super::apply::ensure_admin_secret`]).

use std::time::Duration;

use inferpool_crds::pool::condition::{DEGRADED, READY, SLA_COMPLIANT};
use inferpool_crds::{InferencePool, InferencePoolStatus, Tuning};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use super::Context;
use super::apply::{apply, ensure_admin_secret};
use crate::autoscale::decisions::PoolRef;
use crate::build::{self, FIELD_MANAGER};
use crate::error::{Error, Result};
use crate::events::event;
use crate::metrics::Metrics;
use crate::observe;
use crate::status::{self, Rollout};
use crate::validate::validate;

/// How often an unchanged pool is looked at again.
const RESYNC: Duration = Duration::from_secs(300);
/// How often a pool whose rollout is under way is looked at again.
const ROLLING: Duration = Duration::from_secs(10);

/// Reconciles one pool.
pub async fn reconcile_pool(pool: &InferencePool, ctx: &Context) -> Result<Action> {
    let namespace = pool.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    tracing::debug!("reconciling");
    if pool.metadata.deletion_timestamp.is_some() {
        // The garbage collector removes the children; nothing to do.
        return Ok(Action::await_change());
    }
    let pools: Api<InferencePool> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Err(errors) = validate(pool, &ctx.settings) {
        let error = Error::InvalidSpec(errors);
        report_invalid(pool, &pools, ctx, &error.to_string()).await?;
        return Err(error);
    }

    // Dereference: the admin-token Secret (made once), the autoscaler's latest decision and the
    // caches' view of the children.
    ensure_admin_secret(ctx, pool, &namespace).await?;
    let applied = ctx.decisions.get(&PoolRef::from_obj(pool));
    let replicas = build::desired_replicas(pool, applied.as_ref().map(|a| a.decision.replicas));
    let tuning = applied.as_ref().map_or_else(|| build::desired_tuning(pool), |a| a.decision.tuning);
    let stores = ctx.stores().await;

    // Build (pure), then apply.
    let children = build::children(pool, &ctx.settings, replicas, &tuning)?;
    let deployment = apply(ctx, pool, &stores.deployments, &children.deployment).await?;
    apply(ctx, pool, &stores.services, &children.service).await?;
    apply(ctx, pool, &stores.config_maps, &children.tuning).await?;
    apply(ctx, pool, &stores.pdbs, &children.pdb).await?;
    tracing::debug!(replicas, "children applied");

    // Status.
    let rollout = Rollout::of(Some(&deployment), replicas);
    let mut status = pool.status.clone().unwrap_or_default();
    status.observed_generation = pool.metadata.generation;
    status.replicas = rollout.replicas;
    status.ready_replicas = rollout.ready;
    status.desired_replicas = replicas;
    status.selector = build::selector_string(&pool.name_any());
    status.endpoint = Some(build::endpoint(pool)?);
    status.tuning = Some(tuning);
    if status.model.is_none() || pool.status.as_ref().and_then(|s| s.observed_generation) != pool.metadata.generation {
        // Until a replica of this generation reports the model's name, the spec's URI stands in.
        status.model = Some(pool.spec.model.uri.clone());
    }
    // The variant is read back from a replica when none is known yet and whenever a rollout has
    // just completed (a new template may have picked another variant).
    if rollout.ready > 0
        && (status.variant.is_none() || (rollout.complete() && !was_settled(pool)))
        && let Some(report) = observe::replica_report(&stores.pods, &ctx.http, pool).await
    {
        status.model = Some(report.model);
        status.variant = Some(report.variant);
    }
    let mut wanted = status::rollout_conditions(&rollout);
    match &applied {
        Some(applied) => {
            let observed = &applied.decision.observed;
            status.sla = observed.sla_status();
            status.last_decision = applied.last_change.clone();
            wanted.push(status::sla_condition(observed, pool.spec.sla.p95_latency_ms));
            wanted.push(status::anomaly_condition(applied.decision.anomaly.as_deref()));
        }
        None if !status.conditions.iter().any(|c| c.type_ == SLA_COMPLIANT) => wanted.push(status::sla_unknown()),
        None => {}
    }
    let now = Time(Timestamp::now());
    status::set_conditions(&mut status, wanted, pool.metadata.generation, &now);
    record_pool_metrics(&ctx.metrics, pool, &rollout, &tuning);
    write_status(pool, &pools, ctx, status).await?;

    Ok(Action::requeue(if rollout.complete() { RESYNC } else { ROLLING }))
}

/// The pool's replicas and tuning as metrics (the dashboard's "desired / ready" and "in force").
fn record_pool_metrics(metrics: &Metrics, pool: &InferencePool, rollout: &Rollout, tuning: &Tuning) {
    let (namespace, name) = (pool.namespace().unwrap_or_default(), pool.name_any());
    let set = |vec: &prometheus::IntGaugeVec, label: &str, value: i64| {
        vec.with_label_values(&[namespace.as_str(), name.as_str(), label]).set(value);
    };
    set(&metrics.pool_replicas, "desired", i64::from(rollout.desired));
    set(&metrics.pool_replicas, "ready", i64::from(rollout.ready));
    set(&metrics.pool_tuning, "max_batch_size", i64::from(tuning.max_batch_size));
    set(&metrics.pool_tuning, "max_delay_ms", i64::from(tuning.max_delay_ms));
    if let Some(entries) = tuning.cache_entries {
        set(&metrics.pool_tuning, "cache_entries", i64::try_from(entries).unwrap_or(i64::MAX));
    }
}

/// Whether the stored status already describes this generation as fully rolled out.
fn was_settled(pool: &InferencePool) -> bool {
    let Some(status) = pool.status.as_ref() else { return false };
    let ready = status.conditions.iter().any(|c| c.type_ == READY && c.status == "True");
    ready && status.observed_generation == pool.metadata.generation
}

async fn report_invalid(pool: &InferencePool, pools: &Api<InferencePool>, ctx: &Context, message: &str) -> Result<()> {
    let old = pool.status.clone().unwrap_or_default();
    let already =
        old.conditions.iter().any(|c| c.type_ == DEGRADED && c.reason == "InvalidSpec" && c.message == message);
    if !already {
        ctx.publish(pool, event(EventType::Warning, "InvalidSpec", "Validate", message.to_owned(), None)).await;
    }
    let mut status = old;
    status.observed_generation = pool.metadata.generation;
    let now = Time(Timestamp::now());
    status::set_conditions(&mut status, status::invalid_spec_conditions(message), pool.metadata.generation, &now);
    write_status(pool, pools, ctx, status).await
}

/// Writes the status when it differs from the stored one (server-side apply, status subresource).
async fn write_status(
    pool: &InferencePool,
    pools: &Api<InferencePool>,
    ctx: &Context,
    status: InferencePoolStatus,
) -> Result<()> {
    if pool.status.as_ref() == Some(&status) || ctx.written.status_just_written(pool, &status) {
        return Ok(());
    }
    let body = serde_json::json!({
        "apiVersion": InferencePool::api_version(&()),
        "kind": InferencePool::kind(&()),
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    pools.patch_status(&pool.name_any(), &params, &Patch::Apply(&body)).await?;
    ctx.written.status_written(pool, status);
    Ok(())
}

//! One tick of observation: every ready replica's SLA report, read concurrently with a short
//! timeout, turned into a pool-wide [`Sample`]. A replica that does not answer counts as silent
//! (unhealthy), never as a replica with no load.

use futures::StreamExt;
use inferpool_crds::SlaReport;

use super::{PodSample, Sample};
use crate::pods::{self, HttpClient};

/// Replicas read at the same time, per pool.
const CONCURRENCY: usize = 16;

/// A replica's figures from its shortest report window (2 s, one autoscaler tick).
pub fn pod_sample(pod: &str, report: &SlaReport) -> Option<PodSample> {
    let window = report.windows.iter().min_by_key(|w| w.seconds)?;
    Some(PodSample {
        pod: pod.to_owned(),
        rps: window.rps,
        error_rate: window.error_rate,
        requests: window.requests,
        p95_ms: window.latency_ms.p95,
        queue_wait_p95_ms: window.queue_wait_p95_ms,
        inference_p95_ms: window.inference_p95_ms,
        mean_batch_size: window.mean_batch_size,
        cache_hit_rate: window.cache_hit_rate,
        cache_lookups: window.cache_lookups,
        queue_depth: report.queue_depth,
        rss_bytes: report.rss_bytes,
        tuning_generation: report.tuning.generation,
    })
}

/// Reads `ready` replicas (name, IP); `starting` is how many more exist but are not ready.
pub async fn sample(http: &HttpClient, ready: &[(String, String)], starting: u32, at: f64) -> Sample {
    let answers: Vec<Option<PodSample>> = futures::stream::iter(ready)
        .map(|(name, ip)| async move {
            match pods::sla_report(http, ip).await {
                Ok(report) if report.ready => pod_sample(name, &report),
                Ok(_) => None,
                Err(error) => {
                    tracing::debug!(pod = %name, %error, "no SLA report");
                    None
                }
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let silent = answers.iter().filter(|a| a.is_none()).count();
    let mut pods: Vec<PodSample> = answers.into_iter().flatten().collect();
    pods.sort_by(|a, b| a.pod.cmp(&b.pod));
    Sample { at, pods, starting, silent: u32::try_from(silent).unwrap_or(u32::MAX) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use inferpool_crds::{LatencyQuantiles, Tuning, WindowReport};

    fn window(seconds: u32, rps: f64) -> WindowReport {
        WindowReport {
            seconds,
            requests: (rps * f64::from(seconds)) as u64,
            rps,
            errors: 0,
            error_rate: 0.01,
            latency_ms: LatencyQuantiles { p50: 10.0, p95: 40.0, p99: 80.0 },
            queue_wait_p95_ms: 5.0,
            inference_p95_ms: 30.0,
            batches: 10,
            mean_batch_size: 4.0,
            cache_lookups: 10,
            cache_hit_rate: 0.5,
            cache_hit_rate_by_tier: Default::default(),
        }
    }

    #[test]
    fn a_pod_sample_comes_from_the_shortest_window() {
        let report = SlaReport {
            model: "m".into(),
            variant: "fp32".into(),
            provider: "cpu".into(),
            ready: true,
            tuning: Tuning { generation: 7, max_batch_size: 16, max_delay_ms: 5, cache_entries: None },
            rss_bytes: 1 << 30,
            queue_depth: 3,
            uptime_seconds: 100.0,
            windows: vec![window(60, 10.0), window(2, 25.0), window(10, 20.0)],
        };
        let sample = pod_sample("p-1", &report).unwrap_or_else(|| panic!("no sample"));
        assert_eq!((sample.rps, sample.requests, sample.tuning_generation), (25.0, 50, 7));
        assert_eq!((sample.p95_ms, sample.queue_depth, sample.rss_bytes), (40.0, 3, 1 << 30));
        assert!(pod_sample("p-1", &SlaReport { windows: vec![], ..report }).is_none());
    }

    #[tokio::test]
    async fn replicas_that_do_not_answer_are_silent_not_idle() {
        // A loopback address nothing in the tests binds: the connection is refused at once.
        let http = pods::client();
        let ready = vec![("a".to_owned(), "127.255.255.254".to_owned())];
        let sample = sample(&http, &ready, 2, 4.0).await;
        assert_eq!((sample.pods.len(), sample.silent, sample.starting, sample.at), (0, 1, 2, 4.0));
    }
}

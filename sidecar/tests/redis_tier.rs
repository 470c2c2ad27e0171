//! The Redis cache tier against a real `redis-server`: batched lookups, write-behind writes, TTLs,
//! the circuit breaker through a killed, restarted and paused server, passwords, TLS, and the
//! profile set shared between replicas.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::{RedisServer, free_port, make_tls_files};
use inferpool_sidecar::cache::Key;
use inferpool_sidecar::cache::redis::{BreakerState, Lookup, ProfileSnapshot, RedisConfig, RedisError, RedisTier};
use inferpool_sidecar::labels::{ErrorKind, Tier};
use inferpool_sidecar::metrics::Metrics;
use tokio::task::JoinSet;

/// The lookup budget in these tests: the production default (20 ms) is tight for a debug build on
/// a busy test machine, and nothing here depends on the exact value.
const BUDGET: Duration = Duration::from_millis(100);
/// What a lookup may take beyond its budget (scheduling, channel hops).
const SLACK: Duration = Duration::from_millis(150);
/// How long a test waits for something that should happen in well under a second.
const PATIENCE: Duration = Duration::from_secs(30);

fn config(url: String) -> RedisConfig {
    RedisConfig { ttl: Duration::from_secs(60), timeout: BUDGET, ..RedisConfig::new(url, "test:") }
}

fn start_tier(cfg: RedisConfig) -> (Arc<RedisTier>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new().unwrap());
    (RedisTier::start(cfg, metrics.clone()).unwrap(), metrics)
}

async fn connected(tier: &RedisTier) {
    let mut rx = tier.subscribe_connected();
    tokio::time::timeout(PATIENCE, rx.wait_for(|up| *up)).await.expect("never connected").unwrap();
}

/// A lookup that must answer within its budget whatever Redis does.
async fn get(tier: &RedisTier, key: &Key) -> Lookup {
    let start = Instant::now();
    let found = tokio::time::timeout(BUDGET + SLACK, tier.get(key)).await.expect("a lookup outlived its budget");
    assert!(start.elapsed() < BUDGET + SLACK, "{:?}", start.elapsed());
    found
}

fn key(n: u32) -> Key {
    Key::of("model@1", &n.to_le_bytes())
}

fn failures(metrics: &Metrics) -> u64 {
    [ErrorKind::Timeout, ErrorKind::Connection, ErrorKind::Protocol]
        .map(|k| metrics.cache_errors(Tier::Redis, k))
        .iter()
        .sum()
}

/// Waits until a connection error is counted (refused credentials); the counter has no change
/// feed, so it is polled.
async fn until_refused(metrics: &Metrics, what: &str) {
    let counted = async {
        while metrics.cache_errors(Tier::Redis, ErrorKind::Connection) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, counted).await.unwrap_or_else(|_| panic!("{what} was not counted"));
}

/// Lookups every 20 ms in the background, so the breaker gets probes while a test waits for it.
fn traffic(tier: &Arc<RedisTier>) -> tokio::task::JoinHandle<()> {
    let tier = tier.clone();
    tokio::spawn(async move {
        loop {
            let _ = tier.get(&key(u32::MAX)).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

async fn wait_for_state(tier: &RedisTier, want: BreakerState) {
    let mut rx = tier.subscribe_state();
    tokio::time::timeout(PATIENCE, rx.wait_for(|s| *s == want))
        .await
        .unwrap_or_else(|_| panic!("the breaker never became {want:?}"))
        .unwrap();
}

#[tokio::test]
async fn put_then_get_round_trips_with_a_ttl() {
    let server = RedisServer::start();
    let (tier, _) = start_tier(config(server.url()));
    connected(&tier).await;
    assert!(tier.is_connected());

    let value = vec![7u8, 0, 255, 1, 2, 3];
    tier.put(key(1), value.clone());
    tier.flush().await;
    assert_eq!(get(&tier, &key(1)).await, Lookup::Hit(value));
    assert_eq!(get(&tier, &key(2)).await, Lookup::Miss);

    let name = format!("test:emb:{}", key(1).hex());
    let pttl: i64 = server.cli(&["PTTL", &name]).parse().unwrap();
    assert!(pttl > 0 && pttl <= 60_000, "PTTL {pttl}");
    assert_eq!(tier.state(), BreakerState::Closed);
}

#[tokio::test]
async fn concurrent_lookups_share_mgets() {
    let server = RedisServer::start();
    let (tier, _) = start_tier(config(server.url()));
    connected(&tier).await;
    for n in 0..25 {
        tier.put(key(n), n.to_le_bytes().to_vec());
    }
    tier.flush().await;
    assert_eq!(server.cli(&["CONFIG", "RESETSTAT"]), "OK");

    let mut gets = JoinSet::new();
    for n in 0..50 {
        let tier = tier.clone();
        gets.spawn(async move { (n, tier.get(&key(n)).await) });
    }
    let answers = tokio::time::timeout(PATIENCE, gets.join_all()).await.unwrap();
    assert_eq!(answers.len(), 50);
    for (n, found) in answers {
        let want = if n < 25 { Lookup::Hit(n.to_le_bytes().to_vec()) } else { Lookup::Miss };
        assert_eq!(found, want, "key {n}");
    }
    let stats = server.cli(&["INFO", "commandstats"]);
    let calls: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_mget:calls="))
        .and_then(|rest| rest.split(',').next())
        .expect("no MGET in INFO commandstats")
        .parse()
        .unwrap();
    assert!(calls < 50, "{calls} MGETs for 50 lookups");
}

#[tokio::test]
async fn a_killed_redis_opens_the_breaker_and_a_restarted_one_closes_it() {
    let mut server = RedisServer::start();
    let (tier, metrics) = start_tier(config(server.url()));
    connected(&tier).await;
    tier.put(key(1), b"before".to_vec());
    tier.flush().await;
    assert_eq!(get(&tier, &key(1)).await, Lookup::Hit(b"before".to_vec()));

    server.kill();
    for _ in 0..20 {
        assert_eq!(get(&tier, &key(1)).await, Lookup::Skipped);
        if tier.state() == BreakerState::Open {
            break;
        }
    }
    assert_eq!(tier.state(), BreakerState::Open);
    assert!(failures(&metrics) >= 3, "failures counted: {}", failures(&metrics));
    // Open: lookups are skipped without asking, and writes are dropped.
    assert_eq!(get(&tier, &key(1)).await, Lookup::Skipped);
    let dropped = metrics.cache_errors(Tier::Redis, ErrorKind::Dropped);
    tier.put(key(2), b"lost".to_vec());
    assert_eq!(metrics.cache_errors(Tier::Redis, ErrorKind::Dropped), dropped + 1);

    server.restart();
    let traffic = traffic(&tier);
    wait_for_state(&tier, BreakerState::Closed).await;
    traffic.abort();
    // The same tier, without being recreated, works again (the restarted server is empty).
    assert_eq!(get(&tier, &key(1)).await, Lookup::Miss);
    tier.put(key(1), b"after".to_vec());
    tier.flush().await;
    assert_eq!(get(&tier, &key(1)).await, Lookup::Hit(b"after".to_vec()));
    assert!(tier.is_connected());
}

#[tokio::test]
async fn a_paused_redis_costs_a_lookup_its_budget_and_no_more() {
    let server = RedisServer::start();
    let (tier, metrics) = start_tier(config(server.url()));
    connected(&tier).await;
    tier.put(key(1), b"v".to_vec());
    tier.flush().await;

    server.pause();
    let start = Instant::now();
    assert_eq!(get(&tier, &key(1)).await, Lookup::Skipped);
    let took = start.elapsed();
    assert!(took >= BUDGET - Duration::from_millis(5), "skipped before the budget ran out: {took:?}");
    // The reader's MGET times out too, and is counted, while Redis is still paused.
    tokio::time::timeout(PATIENCE, async {
        while metrics.cache_errors(Tier::Redis, ErrorKind::Timeout) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the timeout was not counted");
    server.resume();

    // The late reply to the timed-out MGET must not be taken for a later lookup's.
    assert_eq!(get(&tier, &key(2)).await, Lookup::Miss);
    assert_eq!(get(&tier, &key(1)).await, Lookup::Hit(b"v".to_vec()));
    assert_eq!(tier.state(), BreakerState::Closed);
}

#[tokio::test]
async fn redis_down_at_start_is_no_error_and_is_picked_up_later() {
    let port = free_port();
    let (tier, metrics) = start_tier(config(format!("redis://127.0.0.1:{port}/0")));
    assert!(!tier.is_connected());
    assert_eq!(get(&tier, &key(1)).await, Lookup::Skipped);
    tier.put(key(1), b"nowhere".to_vec());
    assert_eq!(metrics.cache_errors(Tier::Redis, ErrorKind::Dropped), 1);

    let _server = RedisServer::start_on(port);
    connected(&tier).await;
    tier.put(key(1), b"v".to_vec());
    tier.flush().await;
    assert_eq!(get(&tier, &key(1)).await, Lookup::Hit(b"v".to_vec()));
}

#[tokio::test]
async fn passwords_come_from_the_config_or_the_url_and_wrong_ones_fail() {
    let server = RedisServer::start_with_password("s3cret");
    let port = server.port();

    let from_config = RedisConfig { password: Some("s3cret".into()), ..config(server.url()) };
    let from_url = config(format!("redis://:s3cret@127.0.0.1:{port}/0"));
    for cfg in [from_config, from_url] {
        let (tier, _) = start_tier(cfg);
        connected(&tier).await;
        tier.put(key(1), b"v".to_vec());
        tier.flush().await;
        assert_eq!(get(&tier, &key(1)).await, Lookup::Hit(b"v".to_vec()));
    }

    // The configured password wins over the URL's.
    let wrong = RedisConfig { password: Some("wrong".into()), ..config(format!("redis://:s3cret@127.0.0.1:{port}/0")) };
    let (tier, metrics) = start_tier(wrong);
    until_refused(&metrics, "the rejected password").await;
    assert!(!tier.is_connected());
    assert_eq!(get(&tier, &key(1)).await, Lookup::Skipped);
}

#[tokio::test]
async fn profiles_reach_other_replicas_with_tombstones() {
    let server = RedisServer::start();
    let (a, _) = start_tier(config(server.url()));
    let (b, _) = start_tier(config(server.url()));
    connected(&a).await;
    connected(&b).await;
    assert_eq!(b.profiles_since(0).await.unwrap(), None);

    a.profile_put("alice", b"one").await.unwrap();
    a.profile_put("bob", b"two").await.unwrap();
    let first = b.profiles_since(0).await.unwrap().expect("b missed a's profiles");
    assert_eq!(
        first,
        ProfileSnapshot {
            version: 2,
            entries: vec![("alice".into(), Some(b"one".to_vec())), ("bob".into(), Some(b"two".to_vec()))],
        }
    );
    assert_eq!(b.profiles_since(first.version).await.unwrap(), None);

    a.profile_delete("alice").await.unwrap();
    let second = b.profiles_since(first.version).await.unwrap().expect("b missed the deletion");
    assert_eq!(second.version, 3);
    assert_eq!(second.entries, vec![("alice".into(), None), ("bob".into(), Some(b"two".to_vec()))]);
    assert_eq!(server.cli(&["GET", "test:profiles:version"]), "3");
}

/// The prefixes the operator gives two pools (docs/cache.md, "Key layout").
fn pool(server: &RedisServer, name: &str) -> RedisConfig {
    RedisConfig {
        ttl: Duration::from_secs(60),
        timeout: BUDGET,
        ..RedisConfig::new(server.url(), format!("inferpool:prod:{name}:"))
    }
}

#[tokio::test]
async fn pools_on_one_redis_never_see_or_delete_each_others_keys_unless_they_share_embeddings() {
    let server = RedisServer::start();
    let (shop, _) = start_tier(pool(&server, "shop"));
    let (news, _) = start_tier(pool(&server, "news"));
    connected(&shop).await;
    connected(&news).await;

    shop.profile_put("alice", b"shop's").await.unwrap();
    assert_eq!(news.profiles_since(0).await.unwrap(), None, "news sees shop's profiles");
    news.profile_put("alice", b"news's").await.unwrap();
    news.profile_delete("alice").await.unwrap();
    let kept = shop.profiles_since(0).await.unwrap().expect("shop lost its profiles");
    assert_eq!(kept.entries, vec![("alice".into(), Some(b"shop's".to_vec()))]);

    shop.put(key(1), b"shop's embedding".to_vec());
    shop.flush().await;
    assert_eq!(get(&shop, &key(1)).await, Lookup::Hit(b"shop's embedding".to_vec()));
    assert_eq!(get(&news, &key(1)).await, Lookup::Miss, "news reads shop's embeddings");

    // Two pools that opt into sharing embeddings share those, and still nothing else.
    let shared = |name: &str| RedisConfig { embedding_prefix: "inferpool:shared:".into(), ..pool(&server, name) };
    let (a, _) = start_tier(shared("shop"));
    let (b, _) = start_tier(shared("news"));
    connected(&a).await;
    connected(&b).await;
    a.put(key(2), b"one model's embedding".to_vec());
    a.flush().await;
    assert_eq!(get(&b, &key(2)).await, Lookup::Hit(b"one model's embedding".to_vec()));
    assert_eq!(b.profiles_since(0).await.unwrap().map(|s| s.entries.len()), Some(1), "news has only its tombstone");
    let mut keys: Vec<String> = server.cli(&["KEYS", "*"]).lines().map(str::to_owned).collect();
    keys.sort();
    let emb = |prefix: &str, n: u32| format!("{prefix}emb:{}", key(n).hex());
    let mut want = vec![
        "inferpool:prod:news:profiles".to_owned(),
        "inferpool:prod:news:profiles:version".to_owned(),
        "inferpool:prod:shop:profiles".to_owned(),
        "inferpool:prod:shop:profiles:version".to_owned(),
        emb("inferpool:prod:shop:", 1),
        emb("inferpool:shared:", 2),
    ];
    want.sort();
    assert_eq!(keys, want);
}

#[tokio::test]
async fn an_acl_user_limited_to_its_pools_keys_works_and_cannot_touch_another_pools() {
    let server = RedisServer::start();
    // What docs/security.md tells an admin to create for the pool prod/shop.
    let setuser = ["ACL", "SETUSER", "shop", "on", ">shop-pw", "resetkeys", "~inferpool:prod:shop:*", "+@all"];
    assert_eq!(server.cli(&setuser), "OK");
    let as_shop = |pool_name: &str| RedisConfig {
        username: Some("shop".into()),
        password: Some("shop-pw\n".into()),
        ..pool(&server, pool_name)
    };

    let (own, metrics) = start_tier(as_shop("shop"));
    connected(&own).await;
    own.profile_put("alice", b"one").await.unwrap();
    own.put(key(1), b"v".to_vec());
    own.flush().await;
    assert_eq!(get(&own, &key(1)).await, Lookup::Hit(b"v".to_vec()));
    assert_eq!(failures(&metrics), 0);

    let (other, _) = start_tier(as_shop("news"));
    connected(&other).await;
    let refused = other.profile_put("alice", b"overwrite").await.unwrap_err();
    assert!(matches!(&refused, RedisError::Command(m) if m.to_lowercase().contains("noperm")), "{refused}");
    assert_eq!(server.cli(&["HGET", "inferpool:prod:shop:profiles", "alice"]), "one");

    let (wrong, metrics) = start_tier(RedisConfig { username: Some("nobody".into()), ..as_shop("shop") });
    until_refused(&metrics, "the unknown user").await;
    assert!(!wrong.is_connected());
}

#[tokio::test]
async fn profile_calls_fail_fast_while_redis_is_unreachable() {
    let (tier, _) = start_tier(config(format!("redis://127.0.0.1:{}/0", free_port())));
    assert!(matches!(tier.profile_put("a", b"x").await, Err(RedisError::Unavailable)));
    assert!(matches!(tier.profiles_since(0).await, Err(RedisError::Unavailable)));
}

#[tokio::test]
async fn invalid_urls_are_rejected_with_a_reason() {
    let cases = [
        ("http://x", "scheme"),
        ("redis://", "host"),
        ("garbage", "scheme"),
        ("", "scheme"),
        ("unix:///tmp/redis.sock", "scheme"),
        ("redis://127.0.0.1:6379/notadb", "database"),
        ("redis://127.0.0.1:99999", "parse"),
    ];
    for (url, reason) in cases {
        let metrics = Arc::new(Metrics::new().unwrap());
        match RedisTier::start(config(url.into()), metrics) {
            Err(RedisError::InvalidUrl(why)) => {
                assert!(why.to_lowercase().contains(reason), "{url:?}: {why:?} does not say {reason:?}")
            }
            Err(other) => panic!("{url:?}: {other}"),
            Ok(_) => panic!("{url:?} was accepted"),
        }
    }
    // Valid URLs are accepted whether or not anything listens there; rediss means TLS.
    for url in ["redis://127.0.0.1:1/0", "redis://user:pw@cache.invalid:6380/3", "rediss://localhost:1/0"] {
        let metrics = Arc::new(Metrics::new().unwrap());
        assert!(RedisTier::start(config(url.into()), metrics).is_ok(), "{url}");
    }
}

/// Environment of the child process that [`tls_round_trips`] runs: the URL of its TLS server. The
/// CA is passed in `SSL_CERT_FILE`, which the redis crate's rustls setup reads for its roots; the
/// variable is process-wide, hence the child process.
const TLS_URL_VAR: &str = "INFERPOOL_TEST_REDISS_URL";

#[test]
fn tls_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let (tls, ca) = make_tls_files(dir.path()).expect("openssl is needed to make test certificates: run `make setup`");
    let server = RedisServer::start_tls(tls);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["tls_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("SSL_CERT_FILE", &ca)
        .env(TLS_URL_VAR, server.url())
        .output()
        .unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && log.contains("1 passed"), "{log}");
}

/// The TLS half of `tls_round_trips`: it needs SSL_CERT_FILE naming the test CA before rustls
/// loads its roots, which only a fresh process can guarantee, so that test runs this one as
/// `<test binary> tls_child --exact --ignored` with the variable set. Not meant to run alone.
#[tokio::test]
#[ignore = "run by tls_round_trips in a child process"]
async fn tls_child() {
    let Ok(url) = std::env::var(TLS_URL_VAR) else { return };
    let (tier, _) = start_tier(RedisConfig { timeout: Duration::from_secs(1), ..config(url) });
    connected(&tier).await;
    tier.put(key(1), b"over tls".to_vec());
    tier.flush().await;
    assert_eq!(tier.get(&key(1)).await, Lookup::Hit(b"over tls".to_vec()));
}

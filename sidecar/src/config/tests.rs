//! Flag parsing: defaults, and every bad value reported at once.

use super::*;

fn parse(args: &[&str]) -> Result<Config, ConfigError> {
    let argv = std::iter::once("inferpool-sidecar").chain(args.iter().copied());
    Args::try_parse_from(argv).map_err(|e| ConfigError(vec![e.to_string()]))?.into_config()
}

#[test]
fn defaults_are_valid_once_setup_has_run() {
    let model = source_root().unwrap().join("models/effnet_lite0/card.json");
    let cfg = parse(&["--model", model.to_str().unwrap()]).unwrap();
    assert_eq!(cfg.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(cfg.admin_listen, "127.0.0.1:9090".parse().unwrap());
    assert_eq!(cfg.tuning.max_batch_size, 16);
    assert_eq!(cfg.optimization, Optimization::Balanced);
    assert_eq!(cfg.threads, None, "chosen for the provider at load");
    assert!(cfg.decode_threads >= 1);
    assert_eq!(cfg.jpeg_decode, JpegDecode::Reduced);
}

#[test]
fn every_bad_value_is_reported_at_once() {
    let err = parse(&[
        "--listen",
        "nowhere",
        "--max-batch",
        "0",
        "--max-delay-ms",
        "abc",
        "--optimization",
        "Fastest",
        "--provider",
        "tpu",
        "--sessions",
        "0",
        "--model",
        "/nonexistent/card.json",
        "--admin-token-file",
        "/nonexistent/token",
        "--jpeg-decode",
        "half",
        "--decode-threads",
        "many",
    ])
    .unwrap_err();
    let text = err.to_string();
    for needle in [
        "--listen",
        "--max-batch 0",
        "--max-delay-ms \"abc\"",
        "Fastest",
        "tpu",
        "--sessions 0",
        "/nonexistent/card.json",
        "/nonexistent/token",
        "--jpeg-decode \"half\": \"half\": expected reduced or full",
        "--decode-threads \"many\"",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    assert_eq!(err.0.len(), 10, "{text}");
}

#[test]
fn cache_defaults_and_bad_cache_values() {
    let model = source_root().unwrap().join("models/effnet_lite0/card.json");
    let model = model.to_str().unwrap();
    let cfg = parse(&["--model", model, "--data-dir", "/srv/data"]).unwrap();
    assert_eq!(cfg.cache.memory_entries, 1000);
    assert_eq!(cfg.cache.disk_bytes, 1024 << 20);
    assert_eq!(cfg.cache.dir, PathBuf::from("/srv/data/cache"));
    assert!(cfg.cache.redis.is_none());
    assert_eq!(cfg.cache.encoding, Encoding::F32);

    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("password");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let url = "redis://cache:6379/2";
    let cfg =
        parse(&["--model", model, "--redis-url", url, "--redis-password-file", secret.to_str().unwrap()]).unwrap();
    let redis = cfg.cache.redis.unwrap();
    assert_eq!(
        (redis.password.as_deref(), redis.ttl, redis.timeout),
        (Some("s3cret"), Duration::from_secs(3600), Duration::from_millis(20))
    );

    let err = parse(&[
        "--model",
        model,
        "--memory-entries",
        "2000000",
        "--disk-mb",
        "lots",
        "--redis-url",
        "http://cache:6379",
        "--redis-password-file",
        "/nonexistent/password",
        "--redis-timeout-ms",
        "0",
        "--cache-encoding",
        "f64",
        "--memory-pressure-ratio",
        "2",
    ])
    .unwrap_err();
    let text = err.to_string();
    for needle in [
        "--memory-entries",
        "--disk-mb",
        "--redis-url",
        "/nonexistent/password",
        "--redis-timeout-ms 0",
        "f64",
        "--memory-pressure-ratio 2",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    assert_eq!(err.0.len(), 7, "{text}");
}

//! Turning the configured URL and password into the redis crate's connection settings, and
//! keeping credentials out of everything that is logged or shown.

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo};

use super::{RedisConfig, RedisError};

/// Parses and checks the URL, and applies the configured password.
pub(super) fn connection_info(cfg: &RedisConfig) -> Result<ConnectionInfo, RedisError> {
    let scheme = cfg.url.split_once("://").map(|(scheme, _)| scheme);
    if !matches!(scheme, Some("redis" | "rediss")) {
        return Err(RedisError::InvalidUrl(format!(
            "{:?}: the scheme must be redis:// or rediss://",
            redact(&cfg.url)
        )));
    }
    let invalid = |why: String| RedisError::InvalidUrl(format!("{:?}: {why}", redact(&cfg.url)));
    let info = cfg.url.as_str().into_connection_info().map_err(|e| invalid(e.to_string()))?;
    match info.addr() {
        ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } if !host.is_empty() => {}
        _ => return Err(invalid("no host".into())),
    }
    // A username or password read from a file usually ends with a newline that is not part of it.
    let trimmed = |value: &str| value.trim_end_matches(['\r', '\n']).to_owned();
    let mut redis = info.redis_settings().clone();
    if let Some(username) = &cfg.username {
        redis = redis.set_username(trimmed(username));
    }
    if let Some(password) = &cfg.password {
        redis = redis.set_password(trimmed(password));
    }
    Ok(info.set_redis_settings(redis))
}

/// The URL with any user and password replaced by `***`, fit for logs and errors.
pub(super) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str, password: Option<&str>) -> RedisConfig {
        RedisConfig { password: password.map(Into::into), ..RedisConfig::new(url, "t:") }
    }

    #[test]
    fn the_configured_password_overrides_the_urls() {
        let info = connection_info(&cfg("redis://bob:urlpw@cache:6380/2", Some("filepw\n"))).unwrap();
        assert_eq!(info.addr().to_string(), "cache:6380");
        assert_eq!(info.redis_settings().username(), Some("bob"));
        assert_eq!(info.redis_settings().password(), Some("filepw"));
        assert_eq!(info.redis_settings().db(), 2);
        let info = connection_info(&cfg("redis://:urlpw@cache", None)).unwrap();
        assert_eq!(info.redis_settings().password(), Some("urlpw"));
        assert_eq!(info.addr().to_string(), "cache:6379");
    }

    #[test]
    fn the_configured_username_overrides_the_urls() {
        let cfg = RedisConfig { username: Some("shop\n".into()), ..cfg("redis://bob:pw@cache", None) };
        let info = connection_info(&cfg).unwrap();
        assert_eq!(info.redis_settings().username(), Some("shop"));
        assert_eq!(info.redis_settings().password(), Some("pw"));
    }

    #[test]
    fn rediss_means_tls() {
        let info = connection_info(&cfg("rediss://cache.example:6380", None)).unwrap();
        assert!(matches!(info.addr(), ConnectionAddr::TcpTls { insecure: false, .. }));
    }

    #[test]
    fn bad_urls_are_rejected_without_showing_the_password() {
        for url in ["http://x", "redis://", "garbage", "unix:///tmp/redis.sock", "redis://:pw@h/notadb", ""] {
            let err = connection_info(&cfg(url, None)).unwrap_err();
            assert!(matches!(err, RedisError::InvalidUrl(_)), "{url}: {err}");
            assert!(!err.to_string().contains(":pw@"), "{err}");
        }
    }

    #[test]
    fn redaction_hides_credentials_only() {
        assert_eq!(redact("redis://u:secret@h:1/0"), "redis://***@h:1/0");
        assert_eq!(redact("rediss://h:1/0"), "rediss://h:1/0");
        assert_eq!(redact("redis://h/0?a=b@c"), "redis://h/0?a=b@c");
        let shown = format!("{:?}", cfg("redis://:secret@h", Some("secret2")));
        assert!(!shown.contains("secret"), "{shown}");
    }
}

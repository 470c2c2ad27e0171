//! What the API server double was asked: one entry per request, in order, so tests and
//! benchmarks can count the requests a client makes (a real API server's audit log, in short).
//! The log keeps the latest [`KEEP`] entries; [`Audit::mark`] counts every request ever made.

use parking_lot::Mutex;
use std::collections::VecDeque;

use http::Method;

/// Entries kept; older ones are dropped (the count goes on).
pub const KEEP: usize = 100_000;

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// HTTP method.
    pub method: Method,
    /// Path, e.g. `/apis/apps/v1/namespaces/default/deployments/shop`.
    pub path: String,
    /// Query string, without the `?`.
    pub query: String,
    /// The status code of the answer.
    pub code: u16,
    /// The client's User-Agent.
    pub agent: String,
}

impl Entry {
    /// Whether this request opened a watch (a long-lived stream rather than one exchange).
    pub fn is_watch(&self) -> bool {
        self.query.split('&').any(|pair| pair == "watch=true" || pair == "watch=1")
    }
}

/// The log.
#[derive(Debug, Default)]
pub struct Audit {
    log: Mutex<Log>,
}

#[derive(Debug, Default)]
struct Log {
    total: usize,
    entries: VecDeque<Entry>,
}

impl Audit {
    /// Records one request.
    pub fn record(&self, entry: Entry) {
        let mut log = self.log.lock();
        log.total += 1;
        if log.entries.len() == KEEP {
            log.entries.pop_front();
        }
        log.entries.push_back(entry);
    }

    /// The number of requests so far, to pass to [`Audit::since`] later.
    pub fn mark(&self) -> usize {
        self.log.lock().total
    }

    /// The requests made after `mark` (as many as are still kept).
    pub fn since(&self, mark: usize) -> Vec<Entry> {
        let log = self.log.lock();
        let newer = log.total.saturating_sub(mark).min(log.entries.len());
        log.entries.iter().skip(log.entries.len() - newer).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, query: &str) -> Entry {
        Entry { method: Method::GET, path: path.to_owned(), query: query.to_owned(), code: 200, agent: String::new() }
    }

    #[test]
    fn requests_after_a_mark_are_returned_in_order() {
        let audit = Audit::default();
        audit.record(entry("/a", ""));
        let mark = audit.mark();
        audit.record(entry("/b", "watch=true&resourceVersion=3"));
        audit.record(entry("/c", "watch=false"));
        let since = audit.since(mark);
        assert_eq!(since.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(), ["/b", "/c"]);
        assert_eq!(since.iter().map(Entry::is_watch).collect::<Vec<_>>(), [true, false]);
        assert!(audit.since(audit.mark()).is_empty());
    }
}

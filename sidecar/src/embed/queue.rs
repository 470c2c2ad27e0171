//! The waiting line of a pipeline stage: three priority lanes, first in first out within a lane.
//!
//! The decode stage and the batcher both queue work this way, and admission asks both how much
//! work waits ahead of a new request of a given priority (a high-priority request only waits
//! behind high-priority work).

use std::collections::VecDeque;
use std::time::Instant;

use tokio::sync::oneshot;

/// Request priority, from the `X-Priority` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    /// Served before everything else.
    High = 0,
    /// The default.
    #[default]
    Normal = 1,
    /// Served when nothing else waits.
    Low = 2,
}

/// Something waiting for a stage: it knows its deadline and whether its caller still waits.
pub trait Waiting {
    /// When the caller stops caring.
    fn deadline(&self) -> Instant;
    /// Whether the caller has gone away (its reply channel is closed).
    fn abandoned(&self) -> bool;
}

/// A request's work waiting for a stage: what the stage works on, when it arrived, when its
/// caller stops caring, and the channel the caller waits on.
pub struct Queued<P, R> {
    /// What the stage works on.
    pub payload: P,
    /// When it was queued.
    pub enqueued: Instant,
    /// When the caller stops caring.
    pub deadline: Instant,
    /// Where the answer goes.
    pub reply: oneshot::Sender<R>,
}

impl<P, R> Waiting for Queued<P, R> {
    fn deadline(&self) -> Instant {
        self.deadline
    }
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}

/// What taking the next item found.
pub enum Next<T> {
    /// A live item.
    Live(T),
    /// An item whose deadline had passed: the caller answers it, the stage skips its work.
    Expired(T),
    /// Nothing waits.
    Empty,
}

/// Priority lanes of waiting items.
pub struct Lanes<T> {
    lanes: [VecDeque<T>; 3],
}

impl<T> Default for Lanes<T> {
    fn default() -> Self {
        Self { lanes: Default::default() }
    }
}

impl<T: Waiting> Lanes<T> {
    /// Queues an item at the back of its lane.
    pub fn push(&mut self, priority: Priority, item: T) {
        self.lanes[priority as usize].push_back(item);
    }

    /// Takes the oldest item of the highest non-empty lane, dropping abandoned ones on the way.
    pub fn next(&mut self, now: Instant) -> Next<T> {
        while let Some(item) = self.lanes.iter_mut().find_map(VecDeque::pop_front) {
            if item.abandoned() {
                continue;
            }
            return if now >= item.deadline() { Next::Expired(item) } else { Next::Live(item) };
        }
        Next::Empty
    }

    /// Drops every abandoned item; returns how many went.
    pub fn prune(&mut self) -> usize {
        let mut dropped = 0;
        for lane in &mut self.lanes {
            let before = lane.len();
            lane.retain(|item| !item.abandoned());
            dropped += before - lane.len();
        }
        dropped
    }

    /// Items waiting in all lanes (abandoned ones included until they are dropped).
    pub fn len(&self) -> usize {
        self.lanes.iter().map(VecDeque::len).sum()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.lanes.iter().all(VecDeque::is_empty)
    }

    /// Items a new request of `priority` would wait behind: those of its own and higher lanes.
    pub fn ahead_of(&self, priority: Priority) -> usize {
        self.lanes[..=priority as usize].iter().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct Item {
        tag: u8,
        deadline: Instant,
        abandoned: bool,
    }

    impl Waiting for Item {
        fn deadline(&self) -> Instant {
            self.deadline
        }
        fn abandoned(&self) -> bool {
            self.abandoned
        }
    }

    fn item(tag: u8) -> Item {
        Item { tag, deadline: Instant::now() + Duration::from_secs(60), abandoned: false }
    }

    fn tags(lanes: &mut Lanes<Item>) -> Vec<u8> {
        std::iter::from_fn(|| match lanes.next(Instant::now()) {
            Next::Live(i) | Next::Expired(i) => Some(i.tag),
            Next::Empty => None,
        })
        .collect()
    }

    #[test]
    fn high_priority_leaves_first_and_each_lane_is_fifo() {
        let mut lanes = Lanes::default();
        for (p, tag) in
            [(Priority::Low, 1), (Priority::Normal, 2), (Priority::High, 3), (Priority::Normal, 4), (Priority::High, 5)]
        {
            lanes.push(p, item(tag));
        }
        assert_eq!(
            (lanes.ahead_of(Priority::High), lanes.ahead_of(Priority::Normal), lanes.ahead_of(Priority::Low)),
            (2, 4, 5)
        );
        assert_eq!(tags(&mut lanes), [3, 5, 2, 4, 1]);
        assert!(lanes.is_empty());
    }

    #[test]
    fn abandoned_items_are_skipped_and_expired_ones_reported() {
        let mut lanes = Lanes::default();
        lanes.push(Priority::Normal, Item { abandoned: true, ..item(1) });
        lanes.push(Priority::Normal, Item { deadline: Instant::now(), ..item(2) });
        lanes.push(Priority::Normal, item(3));
        assert!(matches!(lanes.next(Instant::now()), Next::Expired(Item { tag: 2, .. })));
        assert!(matches!(lanes.next(Instant::now()), Next::Live(Item { tag: 3, .. })));
        assert!(matches!(lanes.next(Instant::now()), Next::Empty));
    }

    #[test]
    fn prune_drops_only_abandoned_items() {
        let mut lanes = Lanes::default();
        lanes.push(Priority::Low, Item { abandoned: true, ..item(1) });
        lanes.push(Priority::High, item(2));
        assert_eq!((lanes.prune(), lanes.len()), (1, 1));
        assert_eq!(tags(&mut lanes), [2]);
    }
}

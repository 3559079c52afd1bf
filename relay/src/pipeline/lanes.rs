//! What a worker holds: every row it has read and not yet settled, and one queue (lane) per
//! key in which they wait their turn.
//!
//! The rules that keep per-key order while the stages overlap:
//! - A lane starts its next message only after the previous one is confirmed, unless the
//!   publisher keeps a key's order itself (its depth is more than 1: Kafka's idempotent
//!   producer, gapless), in which case up to that many are at the broker at once.
//! - When a message fails or is let go while later ones of its key are still at the
//!   broker, the lane is broken: nothing of the key starts, and no row of it is taken from
//!   a read, until all of them are back; then the key starts again from its oldest row.
//! - A row stays held (and is passed over by later reads) until its outcome is committed to
//!   PostgreSQL, or until it is let go untouched.
//! - After a failure, the key is blocked: its later rows are dropped from the lane, and rows
//!   of the key read meanwhile are ignored, until the failure is committed (after which the
//!   claim query holds them back behind the failed row, or releases them under `skip`).
//! - A read that was under way when a key's rows were let go may have skipped those rows
//!   and returned later ones; such a read's rows of that key are ignored (the key is
//!   "tainted" for it), and the next read starts again from the key's oldest row.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::envelope::Envelope;

/// A lane: the rows of one key, or a row without a key on its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum LaneId {
    Key(String),
    Alone(i64),
}

impl LaneId {
    pub(crate) fn of(env: &Envelope) -> Self {
        Self::new(env.seq, env.key.as_deref())
    }

    pub(crate) fn new(seq: i64, key: Option<&str>) -> Self {
        match key {
            Some(k) => Self::Key(k.to_owned()),
            None => Self::Alone(seq),
        }
    }
}

#[derive(Debug, Default)]
struct Lane {
    /// Rows waiting, in `seq` order.
    queue: VecDeque<Envelope>,
    /// Messages of this lane at the broker.
    in_flight: u32,
    /// Their topic: a lane's messages are pipelined only within one topic, whose
    /// destination (and so partition) they share.
    flight_topic: String,
    /// One of its messages failed or was let go while others were at the broker.
    broken: bool,
    /// Listed in `ready`.
    listed: bool,
}

#[derive(Debug)]
pub(crate) struct Lanes {
    /// How many messages of one lane may be at the broker at once.
    depth: u32,
    /// Held rows: their payload sizes and partitions.
    held: HashMap<i64, (usize, i16)>,
    held_bytes: usize,
    /// Held rows per partition.
    per_partition: HashMap<i16, usize>,
    /// Bumped whenever a partition starts or stops being busy.
    busy_changes: u64,
    lanes: HashMap<LaneId, Lane>,
    /// Lanes whose head may start (each listed once at most).
    ready: VecDeque<LaneId>,
    /// Keys waiting for a failure to be committed, with how many.
    blocked: HashMap<LaneId, u32>,
    /// A read is under way.
    reading: bool,
    /// Keys let go while the current read was under way.
    tainted: HashSet<LaneId>,
}

impl Lane {
    /// Whether the lane's head may start now, with up to `depth` at the broker.
    fn can_start(&self, depth: u32) -> bool {
        match self.queue.front() {
            None => false,
            Some(_) if self.broken => false,
            Some(_) if self.in_flight == 0 => true,
            Some(head) => self.in_flight < depth && head.topic == self.flight_topic,
        }
    }
}

impl Default for Lanes {
    fn default() -> Self {
        Self::with_depth(1)
    }
}

impl Lanes {
    /// Lanes with up to `depth` messages of a key at the broker at once.
    pub(crate) fn with_depth(depth: u32) -> Self {
        Self {
            depth: depth.max(1),
            held: HashMap::new(),
            held_bytes: 0,
            per_partition: HashMap::new(),
            busy_changes: 0,
            lanes: HashMap::new(),
            ready: VecDeque::new(),
            blocked: HashMap::new(),
            reading: false,
            tainted: HashSet::new(),
        }
    }

    /// Rows held.
    pub(crate) fn held(&self) -> usize {
        self.held.len()
    }

    /// Payload bytes held.
    pub(crate) fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Rows of `partition` held.
    pub(crate) fn held_in(&self, partition: i16) -> usize {
        self.per_partition.get(&partition).copied().unwrap_or(0)
    }

    /// True when nothing is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Changes whenever [`Lanes::busy_partitions`] may have.
    pub(crate) fn busy_changes(&self) -> u64 {
        self.busy_changes
    }

    /// The partitions some held row belongs to, in order: those that must not change
    /// hands yet.
    pub(crate) fn busy_partitions(&self) -> Vec<i16> {
        let mut busy: Vec<i16> = self.per_partition.keys().copied().collect();
        busy.sort_unstable();
        busy
    }

    /// The held rows, for the next read to pass over; marks a read as under way.
    pub(crate) fn start_read(&mut self) -> Vec<i64> {
        self.reading = true;
        self.tainted.clear();
        self.held.keys().copied().collect()
    }

    /// The read ended without rows (it failed or was dropped).
    pub(crate) fn read_failed(&mut self) {
        self.reading = false;
        self.tainted.clear();
    }

    /// Takes in a read's rows (in `seq` order); returns how many were taken.
    pub(crate) fn admit(&mut self, envelopes: Vec<Envelope>) -> usize {
        self.reading = false;
        let mut taken = 0;
        for env in envelopes {
            let id = LaneId::of(&env);
            if self.held.contains_key(&env.seq)
                || self.blocked.contains_key(&id)
                || self.tainted.contains(&id)
                || self.lanes.get(&id).is_some_and(|l| l.broken)
            {
                continue;
            }
            self.hold(env.seq, env.payload.len(), env.partition);
            taken += 1;
            let lane = self.lanes.entry(id.clone()).or_default();
            let at = lane.queue.partition_point(|e| e.seq < env.seq);
            lane.queue.insert(at, env);
            self.list(id);
        }
        self.tainted.clear();
        taken
    }

    /// Holds a row that is being dead-lettered without a publish, and blocks its key until
    /// that is committed. Returns false (and does nothing) when its key is tainted or its
    /// lane broken, or the row is held already.
    pub(crate) fn admit_unpublishable(&mut self, seq: i64, partition: i16, id: &LaneId) -> bool {
        if self.held.contains_key(&seq)
            || self.tainted.contains(id)
            || self.lanes.get(id).is_some_and(|l| l.broken)
        {
            return false;
        }
        self.hold(seq, 0, partition);
        // Rows of the key queued already are older; rows read later wait for the commit.
        *self.blocked.entry(id.clone()).or_default() += 1;
        true
    }

    /// The next message to publish: the head of a lane with fewer than `depth` messages at
    /// the broker. Lanes take turns.
    pub(crate) fn next(&mut self) -> Option<Envelope> {
        while let Some(id) = self.ready.pop_front() {
            let Some(lane) = self.lanes.get_mut(&id) else {
                continue;
            };
            lane.listed = false;
            if !lane.can_start(self.depth) {
                continue;
            }
            if let Some(env) = lane.queue.pop_front() {
                if lane.in_flight == 0 {
                    lane.flight_topic.clone_from(&env.topic);
                }
                lane.in_flight += 1;
                self.list(id);
                return Some(env);
            }
        }
        None
    }

    /// The broker confirmed `env`: its key's next row may start. `env` stays held until its
    /// delete is committed.
    pub(crate) fn confirmed(&mut self, env: &Envelope) {
        let id = LaneId::of(env);
        if let Some(lane) = self.lanes.get_mut(&id) {
            lane.in_flight = lane.in_flight.saturating_sub(1);
            self.back(id);
        }
    }

    /// `env` failed and the failure is to be recorded: its key stops until then. Returns
    /// the key's queued rows, dropped from the lane; they stay held until the failure is
    /// committed (pass them to [`Lanes::settled`] then).
    pub(crate) fn failed(&mut self, env: &Envelope) -> Vec<i64> {
        let id = LaneId::of(env);
        let dropped = match self.lanes.get_mut(&id) {
            Some(lane) => {
                lane.in_flight = lane.in_flight.saturating_sub(1);
                lane.broken = true;
                lane.queue.drain(..).map(|e| e.seq).collect()
            }
            None => Vec::new(),
        };
        *self.blocked.entry(id.clone()).or_default() += 1;
        self.back(id);
        dropped
    }

    /// `env` was not published (the broker is unavailable): it and its key's queued rows are
    /// let go at once, to be read again.
    pub(crate) fn released(&mut self, env: &Envelope) {
        let id = LaneId::of(env);
        self.unhold(env.seq);
        if let Some(lane) = self.lanes.get_mut(&id) {
            lane.in_flight = lane.in_flight.saturating_sub(1);
            lane.broken = true;
            let queued: Vec<i64> = lane.queue.drain(..).map(|e| e.seq).collect();
            for seq in queued {
                self.unhold(seq);
            }
        }
        self.taint(id.clone());
        self.back(id);
    }

    /// A message of lane `id` came back: the lane goes once it is empty (a broken one once
    /// nothing of it is at the broker, tainting its key for a read under way), or is listed
    /// to start its next message.
    fn back(&mut self, id: LaneId) {
        let Some(lane) = self.lanes.get(&id) else {
            return;
        };
        if lane.in_flight > 0 {
            if !lane.broken {
                self.list(id);
            }
            return;
        }
        if lane.broken || lane.queue.is_empty() {
            let broken = lane.broken;
            self.lanes.remove(&id);
            if broken {
                self.taint(id);
            }
        } else {
            self.list(id);
        }
    }

    /// Lists lane `id` as ready if it can start a message and is not listed yet.
    fn list(&mut self, id: LaneId) {
        if let Some(lane) = self.lanes.get_mut(&id) {
            if !lane.listed && lane.can_start(self.depth) {
                lane.listed = true;
                self.ready.push_back(id);
            }
        }
    }

    /// Puts `env`, taken by [`Lanes::next`] and not started, back at the head of its lane
    /// (so that what happens to the lane next, a failure or a release, happens to it too).
    pub(crate) fn put_back(&mut self, env: Envelope) {
        let id = LaneId::of(&env);
        if let Some(lane) = self.lanes.get_mut(&id) {
            lane.in_flight = lane.in_flight.saturating_sub(1);
            lane.queue.push_front(env);
            self.list(id);
        }
    }

    /// `env` could not even be handed to the broker's client: its key starts nothing more
    /// until its outcome is taken in (as a failure, or let go).
    pub(crate) fn stop_key(&mut self, env: &Envelope) {
        if let Some(lane) = self.lanes.get_mut(&LaneId::of(env)) {
            lane.broken = true;
        }
    }

    /// Outcomes committed (or given up on): forgets `seqs` and unblocks the keys of the
    /// failures among them.
    pub(crate) fn settled(&mut self, seqs: impl IntoIterator<Item = i64>, unblock: Vec<LaneId>) {
        for seq in seqs {
            self.unhold(seq);
        }
        for id in unblock {
            if let Some(n) = self.blocked.get_mut(&id) {
                *n -= 1;
                if *n == 0 {
                    self.blocked.remove(&id);
                }
            }
            self.taint(id);
        }
    }

    /// Lets go of every row that has not started (shutting down, or backing off from the
    /// broker); returns how many.
    pub(crate) fn drop_queued(&mut self) -> usize {
        let mut dropped = Vec::new();
        let mut ids = Vec::new();
        self.lanes.retain(|id, lane| {
            if !lane.queue.is_empty() {
                dropped.extend(lane.queue.drain(..).map(|e| e.seq));
                ids.push(id.clone());
            }
            lane.listed = false;
            lane.in_flight > 0
        });
        self.ready.clear();
        for &seq in &dropped {
            self.unhold(seq);
        }
        for id in ids {
            self.taint(id);
        }
        dropped.len()
    }

    fn hold(&mut self, seq: i64, bytes: usize, partition: i16) {
        if self.held.insert(seq, (bytes, partition)).is_none() {
            self.held_bytes += bytes;
            let n = self.per_partition.entry(partition).or_default();
            if *n == 0 {
                self.busy_changes += 1;
            }
            *n += 1;
        }
    }

    fn unhold(&mut self, seq: i64) {
        if let Some((bytes, partition)) = self.held.remove(&seq) {
            self.held_bytes -= bytes;
            if let Some(n) = self.per_partition.get_mut(&partition) {
                *n -= 1;
                if *n == 0 {
                    self.per_partition.remove(&partition);
                    self.busy_changes += 1;
                }
            }
        }
    }

    fn taint(&mut self, id: LaneId) {
        if self.reading {
            self.tainted.insert(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(seq: i64, key: Option<&str>, bytes: usize) -> Envelope {
        Envelope {
            seq,
            // Two partitions: odd and even rows.
            partition: (seq % 2) as i16,
            id: uuid::Uuid::new_v4(),
            topic: "t".into(),
            key: key.map(str::to_owned),
            payload: vec![0; bytes],
            headers: Default::default(),
            content_type: None,
            created_at_unix: 0,
            created_at_micros: 0,
            attempts: 0,
            replay_of: None,
        }
    }

    fn drain(lanes: &mut Lanes) -> Vec<i64> {
        std::iter::from_fn(|| lanes.next()).map(|e| e.seq).collect()
    }

    #[test]
    fn a_message_put_back_shares_its_lanes_failure() {
        let mut lanes = Lanes::with_depth(10);
        lanes.start_read();
        lanes.admit(vec![env(1, Some("a"), 1), env(2, Some("a"), 1)]);
        let first = lanes.next().unwrap();
        let second = lanes.next().unwrap();
        assert_eq!((first.seq, second.seq), (1, 2));
        // 2 was taken but not started (set aside); then 1 fails.
        lanes.put_back(second);
        assert_eq!(lanes.failed(&first), vec![2]);
        assert_eq!(drain(&mut lanes), Vec::<i64>::new());
        assert_eq!(lanes.held(), 2);
    }

    #[test]
    fn a_key_has_one_message_at_the_broker_and_the_next_starts_on_its_confirm() {
        let mut lanes = Lanes::default();
        lanes.start_read();
        let taken = lanes.admit(vec![
            env(1, Some("a"), 1),
            env(2, Some("a"), 1),
            env(3, Some("b"), 1),
            env(4, None, 1),
            env(5, None, 1),
        ]);
        assert_eq!(taken, 5);
        // Heads of "a", "b" and both rows without a key; never a second row of "a".
        assert_eq!(drain(&mut lanes), vec![1, 3, 4, 5]);
        lanes.confirmed(&env(3, Some("b"), 1));
        assert_eq!(drain(&mut lanes), Vec::<i64>::new());
        lanes.confirmed(&env(1, Some("a"), 1));
        assert_eq!(drain(&mut lanes), vec![2]);
        // Confirmed rows stay held (and passed over by reads) until their delete commits.
        assert_eq!(lanes.held(), 5);
        lanes.settled([1, 2, 3, 4, 5], Vec::new());
        assert!(lanes.is_empty());
    }

    #[test]
    fn a_lane_runs_in_seq_order_whatever_order_rows_arrive_in() {
        let mut lanes = Lanes::default();
        lanes.admit(vec![env(7, Some("a"), 1)]);
        lanes.admit(vec![env(3, Some("a"), 1), env(5, Some("a"), 1)]);
        let mut order = Vec::new();
        while let Some(e) = lanes.next() {
            order.push(e.seq);
            lanes.confirmed(&e);
        }
        assert_eq!(order, vec![3, 5, 7]);
    }

    #[test]
    fn a_failure_blocks_its_key_until_it_is_committed() {
        let mut lanes = Lanes::default();
        lanes.admit(vec![
            env(1, Some("a"), 1),
            env(2, Some("a"), 1),
            env(3, Some("a"), 1),
            env(4, Some("b"), 1),
        ]);
        assert_eq!(drain(&mut lanes), vec![1, 4]);
        let dropped = lanes.failed(&env(1, Some("a"), 1));
        assert_eq!(dropped, vec![2, 3]);
        // The dropped rows stay held, and nothing of "a" starts, nor is taken from a read.
        assert_eq!(lanes.held(), 4);
        lanes.start_read();
        assert_eq!(
            lanes.admit(vec![env(9, Some("a"), 1), env(10, Some("b"), 1)]),
            1
        );
        assert_eq!(drain(&mut lanes), Vec::<i64>::new());
        lanes.confirmed(&env(4, Some("b"), 1));
        assert_eq!(drain(&mut lanes), vec![10]);
        // Committed: "a" flows again, from its oldest row.
        let mut settled = vec![1];
        settled.extend(dropped);
        lanes.settled(settled, vec![LaneId::Key("a".into())]);
        lanes.start_read();
        assert_eq!(
            lanes.admit(vec![env(2, Some("a"), 1), env(3, Some("a"), 1)]),
            2
        );
        assert_eq!(drain(&mut lanes), vec![2]);
    }

    #[test]
    fn two_failures_of_a_key_unblock_it_only_when_both_are_committed() {
        let mut lanes = Lanes::default();
        lanes.admit(vec![env(1, Some("a"), 1)]);
        assert!(lanes.admit_unpublishable(2, 0, &LaneId::Key("a".into())));
        assert_eq!(drain(&mut lanes), vec![1]);
        lanes.failed(&env(1, Some("a"), 1));
        lanes.settled([1], vec![LaneId::Key("a".into())]);
        assert_eq!(
            lanes.admit(vec![env(3, Some("a"), 1)]),
            0,
            "one failure is still pending"
        );
        lanes.settled([2], vec![LaneId::Key("a".into())]);
        assert_eq!(lanes.admit(vec![env(3, Some("a"), 1)]), 1);
    }

    #[test]
    fn rows_let_go_while_a_read_is_under_way_taint_their_key_for_that_read_only() {
        let mut lanes = Lanes::default();
        lanes.admit(vec![env(1, Some("a"), 1), env(2, Some("a"), 1)]);
        assert_eq!(drain(&mut lanes), vec![1]);
        // A read starts while 1 and 2 are held, so it passes over them...
        let mut held = lanes.start_read();
        held.sort_unstable();
        assert_eq!(held, vec![1, 2]);
        // ...then the broker goes away: 1 and 2 are let go, to be read again...
        lanes.released(&env(1, Some("a"), 1));
        assert!(lanes.is_empty());
        // ...and that read returns a later row of "a": taking it would run 3 before 1.
        assert_eq!(
            lanes.admit(vec![env(3, Some("a"), 1), env(4, Some("b"), 1)]),
            1
        );
        assert_eq!(drain(&mut lanes), vec![4]);
        // The next read starts from "a"'s oldest row and is taken whole.
        lanes.start_read();
        assert_eq!(
            lanes.admit(vec![
                env(1, Some("a"), 1),
                env(2, Some("a"), 1),
                env(3, Some("a"), 1)
            ]),
            3
        );
        assert_eq!(drain(&mut lanes), vec![1]);
    }

    #[test]
    fn rows_let_go_with_no_read_under_way_taint_nothing() {
        let mut lanes = Lanes::default();
        lanes.admit(vec![env(1, Some("a"), 1)]);
        let started = lanes.next().unwrap();
        lanes.released(&started);
        lanes.start_read();
        assert_eq!(lanes.admit(vec![env(1, Some("a"), 1)]), 1);
    }

    #[test]
    fn a_read_that_fails_does_not_leave_keys_tainted() {
        let mut lanes = Lanes::default();
        lanes.admit(vec![env(1, Some("a"), 1)]);
        let started = lanes.next().unwrap();
        lanes.start_read();
        lanes.released(&started);
        lanes.read_failed();
        lanes.start_read();
        assert_eq!(lanes.admit(vec![env(1, Some("a"), 1)]), 1);
    }

    #[test]
    fn dropping_queued_rows_keeps_those_at_the_broker_and_their_bytes() {
        let mut lanes = Lanes::default();
        lanes.admit(vec![
            env(1, Some("a"), 100),
            env(2, Some("a"), 10),
            env(3, None, 1000),
        ]);
        assert_eq!(lanes.held_bytes(), 1110);
        let at_broker = lanes.next().unwrap();
        assert_eq!(at_broker.seq, 1);
        assert_eq!(lanes.drop_queued(), 2);
        assert_eq!(lanes.held(), 1);
        assert_eq!(lanes.held_bytes(), 100);
        assert!(lanes.next().is_none());
        // The row at the broker still settles normally.
        lanes.confirmed(&at_broker);
        lanes.settled([1], Vec::new());
        assert!(lanes.is_empty());
        assert_eq!(lanes.held_bytes(), 0);
    }

    #[test]
    fn a_partition_is_busy_until_its_last_row_is_settled_or_let_go() {
        let mut lanes = Lanes::default();
        // Rows 1 and 3 in partition 1, 2 in partition 0.
        lanes.admit(vec![
            env(1, Some("a"), 1),
            env(2, Some("b"), 1),
            env(3, Some("a"), 1),
        ]);
        assert_eq!(lanes.busy_partitions(), vec![0, 1]);
        assert_eq!(drain(&mut lanes), vec![1, 2]);
        lanes.confirmed(&env(2, Some("b"), 1));
        // Confirmed is not enough: the delete must be committed.
        assert_eq!(lanes.busy_partitions(), vec![0, 1]);
        let changes = lanes.busy_changes();
        lanes.admit(vec![env(5, Some("c"), 1)]);
        assert_eq!(
            lanes.busy_changes(),
            changes,
            "partition 1 was busy already"
        );
        lanes.settled([2], Vec::new());
        assert_ne!(
            lanes.busy_changes(),
            changes,
            "partition 0 is no longer busy"
        );
        assert_eq!(lanes.busy_partitions(), vec![1]);
        lanes.confirmed(&env(1, Some("a"), 1));
        lanes.settled([1], Vec::new());
        assert_eq!(
            lanes.busy_partitions(),
            vec![1],
            "rows 3 and 5 are still queued"
        );
        assert_eq!(lanes.drop_queued(), 2);
        assert_eq!(lanes.busy_partitions(), Vec::<i16>::new());
    }

    #[test]
    fn with_a_depth_a_key_streams_up_to_it_and_lanes_take_turns() {
        let mut lanes = Lanes::with_depth(3);
        lanes.admit((1..=5).map(|i| env(i, Some("a"), 1)).collect());
        lanes.admit(vec![env(6, Some("b"), 1), env(7, Some("b"), 1)]);
        // "a" and "b" alternate; "a" stops at three at the broker.
        assert_eq!(drain(&mut lanes), vec![1, 6, 2, 7, 3]);
        lanes.confirmed(&env(1, Some("a"), 1));
        assert_eq!(drain(&mut lanes), vec![4]);
        lanes.confirmed(&env(2, Some("a"), 1));
        lanes.confirmed(&env(3, Some("a"), 1));
        assert_eq!(drain(&mut lanes), vec![5]);
    }

    #[test]
    fn a_failure_with_later_messages_at_the_broker_stops_the_key_until_they_are_back() {
        let mut lanes = Lanes::with_depth(4);
        lanes.admit((1..=5).map(|i| env(i, Some("a"), 1)).collect());
        assert_eq!(drain(&mut lanes), vec![1, 2, 3, 4]);
        assert_eq!(lanes.failed(&env(1, Some("a"), 1)), vec![5]);
        lanes.confirmed(&env(2, Some("a"), 1));
        // The failure is committed, but 3 and 4 are still out: nothing of "a" is taken.
        lanes.settled([1, 5], vec![LaneId::Key("a".into())]);
        lanes.start_read();
        assert_eq!(lanes.admit(vec![env(5, Some("a"), 1)]), 0);
        assert!(!lanes.admit_unpublishable(8, 0, &LaneId::Key("a".into())));
        lanes.released(&env(3, Some("a"), 1));
        // A read under way when the last one comes back may have passed over rows of "a".
        lanes.start_read();
        lanes.confirmed(&env(4, Some("a"), 1));
        assert_eq!(lanes.admit(vec![env(5, Some("a"), 1)]), 0);
        // The next read starts again from the oldest row of "a" not at the broker.
        lanes.start_read();
        assert_eq!(
            lanes.admit(vec![env(3, Some("a"), 1), env(5, Some("a"), 1)]),
            2
        );
        assert_eq!(drain(&mut lanes), vec![3, 5]);
    }

    #[test]
    fn a_message_let_go_with_later_ones_at_the_broker_restarts_the_key_from_it() {
        let mut lanes = Lanes::with_depth(8);
        lanes.admit((1..=4).map(|i| env(i, Some("a"), 1)).collect());
        assert_eq!(drain(&mut lanes), vec![1, 2, 3, 4]);
        lanes.released(&env(2, Some("a"), 1));
        // 2 is let go, but 3 and 4 are out: 2 must not start again before they are back.
        assert_eq!(lanes.admit(vec![env(2, Some("a"), 1)]), 0);
        lanes.confirmed(&env(1, Some("a"), 1));
        lanes.released(&env(3, Some("a"), 1));
        assert_eq!(lanes.admit(vec![env(2, Some("a"), 1)]), 0);
        lanes.confirmed(&env(4, Some("a"), 1));
        assert_eq!(
            lanes.admit(vec![env(2, Some("a"), 1), env(3, Some("a"), 1)]),
            2
        );
        assert_eq!(drain(&mut lanes), vec![2, 3]);
        // 1 and 4 stay held until their deletes commit.
        assert_eq!(lanes.held(), 4);
    }

    #[test]
    fn a_key_is_pipelined_only_within_one_topic() {
        let on = |seq, topic: &str| {
            let mut e = env(seq, Some("a"), 1);
            e.topic = topic.into();
            e
        };
        let mut lanes = Lanes::with_depth(8);
        lanes.admit(vec![on(1, "t"), on(2, "t"), on(3, "u"), on(4, "u")]);
        assert_eq!(drain(&mut lanes), vec![1, 2]);
        lanes.confirmed(&on(1, "t"));
        assert_eq!(drain(&mut lanes), Vec::<i64>::new(), "2 is still out");
        lanes.confirmed(&on(2, "t"));
        assert_eq!(drain(&mut lanes), vec![3, 4]);
    }

    #[test]
    fn a_message_refused_before_it_was_handed_over_stops_its_key_at_once() {
        let mut lanes = Lanes::with_depth(8);
        lanes.admit((1..=3).map(|i| env(i, Some("a"), 1)).collect());
        let first = lanes.next().unwrap();
        lanes.stop_key(&first);
        assert!(lanes.next().is_none());
        assert_eq!(lanes.failed(&first), vec![2, 3]);
        assert!(lanes.next().is_none());
    }

    #[test]
    fn a_row_is_held_once_however_often_it_is_read() {
        let mut lanes = Lanes::default();
        assert_eq!(lanes.admit(vec![env(1, Some("a"), 10)]), 1);
        assert_eq!(lanes.admit(vec![env(1, Some("a"), 10)]), 0);
        assert!(!lanes.admit_unpublishable(1, 1, &LaneId::Key("a".into())));
        assert_eq!(lanes.held(), 1);
        assert_eq!(lanes.held_bytes(), 10);
        assert_eq!(drain(&mut lanes), vec![1]);
    }
}

//! What a worker holds: every row it has read and not yet settled, and one queue (lane) per
//! key in which they wait their turn.
//!
//! The rules that keep per-key order while the stages overlap:
//! - A lane starts its next message only after the previous one is confirmed.
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
    /// A message of this lane is at the broker.
    busy: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Lanes {
    /// Held rows and their payload sizes.
    held: HashMap<i64, usize>,
    held_bytes: usize,
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

impl Lanes {
    /// Rows held.
    pub(crate) fn held(&self) -> usize {
        self.held.len()
    }

    /// Payload bytes held.
    pub(crate) fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// True when nothing is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.held.is_empty()
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
            {
                continue;
            }
            self.hold(env.seq, env.payload.len());
            taken += 1;
            let lane = self.lanes.entry(id.clone()).or_default();
            let at = lane.queue.partition_point(|e| e.seq < env.seq);
            lane.queue.insert(at, env);
            if !lane.busy && lane.queue.len() == 1 {
                self.ready.push_back(id);
            }
        }
        self.tainted.clear();
        taken
    }

    /// Holds a row that is being dead-lettered without a publish, and blocks its key until
    /// that is committed. Returns false (and does nothing) when its key is tainted or the
    /// row is held already.
    pub(crate) fn admit_unpublishable(&mut self, seq: i64, id: &LaneId) -> bool {
        if self.held.contains_key(&seq) || self.tainted.contains(id) {
            return false;
        }
        self.hold(seq, 0);
        // Rows of the key queued already are older; rows read later wait for the commit.
        *self.blocked.entry(id.clone()).or_default() += 1;
        true
    }

    /// The next message to publish: the head of a lane with nothing at the broker.
    pub(crate) fn next(&mut self) -> Option<Envelope> {
        while let Some(id) = self.ready.pop_front() {
            if let Some(lane) = self.lanes.get_mut(&id) {
                if !lane.busy {
                    if let Some(env) = lane.queue.pop_front() {
                        lane.busy = true;
                        return Some(env);
                    }
                }
            }
        }
        None
    }

    /// The broker confirmed `env`: its key's next row may start. `env` stays held until its
    /// delete is committed.
    pub(crate) fn confirmed(&mut self, env: &Envelope) {
        let id = LaneId::of(env);
        if let Some(lane) = self.lanes.get_mut(&id) {
            lane.busy = false;
            if lane.queue.is_empty() {
                self.lanes.remove(&id);
            } else {
                self.ready.push_back(id);
            }
        }
    }

    /// `env` failed and the failure is to be recorded: its key stops until then. Returns
    /// the key's queued rows, dropped from the lane; they stay held until the failure is
    /// committed (pass them to [`Lanes::settled`] then).
    pub(crate) fn failed(&mut self, env: &Envelope) -> Vec<i64> {
        let id = LaneId::of(env);
        let dropped = self
            .lanes
            .remove(&id)
            .map(|lane| lane.queue.iter().map(|e| e.seq).collect())
            .unwrap_or_default();
        *self.blocked.entry(id).or_default() += 1;
        dropped
    }

    /// `env` was not published (the broker is unavailable): it and its key's queued rows are
    /// let go at once, to be read again.
    pub(crate) fn released(&mut self, env: &Envelope) {
        let id = LaneId::of(env);
        self.unhold(env.seq);
        if let Some(lane) = self.lanes.remove(&id) {
            for e in lane.queue {
                self.unhold(e.seq);
            }
        }
        self.taint(id);
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
            lane.busy
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

    fn hold(&mut self, seq: i64, bytes: usize) {
        if self.held.insert(seq, bytes).is_none() {
            self.held_bytes += bytes;
        }
    }

    fn unhold(&mut self, seq: i64) {
        if let Some(bytes) = self.held.remove(&seq) {
            self.held_bytes -= bytes;
        }
    }

    fn taint(&mut self, id: LaneId) {
        if self.reading {
            self.tainted.insert(id);
        }
    }
}

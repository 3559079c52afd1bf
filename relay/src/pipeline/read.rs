//! The read stage: keeps the lanes topped up from the worker's partitions, passing over the
//! rows it holds already, within a window bounded in rows (`relay.window`) and in payload
//! bytes (`relay.window_bytes`), and shared between the partitions (see [`share`]).

use std::{collections::HashSet, time::Duration};

use tokio::time::Instant;

use super::{context::Context, lanes::Lanes, Boxed};
use crate::{publish::PublishError, store::Claim};

/// How soon a busy worker reads again after a read that found everything read.
const BUSY_POLL: Duration = Duration::from_millis(5);

/// What a read brought.
pub(super) enum Read {
    /// The broker connection is not up; nothing was read.
    Broker(PublishError),
    Rows {
        claim: Result<Claim, sqlx::Error>,
        took: Duration,
    },
}

/// The read under way, and when the next one is due.
pub(super) struct Reader<'a> {
    /// Partitions that had more rows than the last read of them took.
    hot: HashSet<i16>,
    /// The partitions the read under way may take rows from, and how many reads there were.
    limits: Vec<i16>,
    reads: usize,
    pub(super) under_way: Option<Boxed<'a, Read>>,
    /// The partitions of the read under way: they must not change hands until it is over.
    pub(super) from: Vec<i16>,
    /// When the next read is due.
    pub(super) at: Instant,
    /// The last read found nothing to do: the worker waits the poll interval unless woken.
    /// Only then is it idle; a busy worker looks again within [`BUSY_POLL`] anyway, and
    /// registering for wake-ups would make every producer's commit send a NOTIFY (which
    /// serializes those commits) for nothing.
    pub(super) quiet: bool,
}

impl<'a> Reader<'a> {
    pub(super) fn new() -> Self {
        Self {
            hot: HashSet::new(),
            limits: Vec::new(),
            reads: 0,
            under_way: None,
            from: Vec::new(),
            at: Instant::now(),
            quiet: false,
        }
    }

    /// Whether a read may start, now or when it is due: there is room in the window, and
    /// partitions to read. The read timer is armed only then, so a worker without room
    /// sleeps until a settle makes some.
    pub(super) fn may_read(
        &self,
        ctx: Context<'a>,
        lanes: &Lanes,
        partitions: &[i16],
        may_start: bool,
    ) -> bool {
        let o = ctx.options;
        let room = (o.window as usize).saturating_sub(lanes.held());
        let bytes_room = lanes.held_bytes() < o.window_bytes as usize;
        // Each read passes over every held row, so a full window is topped up in large
        // steps, not one small read per confirm: once half of it is free (with the default
        // window and batch, a read returns up to 1,000 rows past 1,000 held, where reading
        // at a quarter free walked 1,500 held rows for 500: its query time per message fell
        // by about 40%).
        let low_water = (o.batch_size.min(o.window / 2) as usize).max(1);
        may_start
            && self.under_way.is_none()
            && bytes_room
            && (room >= low_water || lanes.is_empty())
            && !partitions.is_empty()
    }

    /// Starts a read of `partitions` for what the window has room for.
    pub(super) fn start(&mut self, ctx: Context<'a>, lanes: &mut Lanes, partitions: &[i16]) {
        let o = ctx.options;
        let room = (o.window as usize).saturating_sub(lanes.held());
        let asked = o.batch_size.min(room as u32).max(1);
        let held = lanes.start_read();
        let bytes = (o.window_bytes as usize).saturating_sub(lanes.held_bytes()) as u64;
        let limits = share(
            partitions,
            &self.hot,
            |p| lanes.held_in(p),
            o.window,
            asked,
            self.reads,
        );
        self.reads = self.reads.wrapping_add(1);
        self.limits = limits.iter().map(|l| l.0).collect();
        self.from = partitions.to_vec();
        self.under_way = Some(Box::pin(async move {
            // Reconnects if the connection dropped (cheap when it is up): no rows are read
            // for a broker that cannot take them.
            if let Err(e) = ctx.publisher.ready().await {
                return Read::Broker(e);
            }
            // Not while partitions change hands; and none given up since the read was
            // planned is read (see `Relay::rebalance`).
            let _handover = ctx.handover.read().await;
            let limits: Vec<(i16, u32)> = {
                let owned = ctx.owned.borrow();
                limits
                    .into_iter()
                    .filter(|l| owned.contains(&l.0))
                    .collect()
            };
            let started = Instant::now();
            let claim = ctx
                .store
                .claim_from(ctx.relay_id, &limits, bytes, &held)
                .await;
            Read::Rows {
                claim,
                took: started.elapsed(),
            }
        }));
    }

    /// The read under way is over (its outcome taken), or dropped.
    pub(super) fn ended(&mut self) {
        self.under_way = None;
        self.from.clear();
    }

    /// A read brought `rows` rows (and `full`: the partitions that had more): when the next
    /// one is due. `drained`: the worker holds nothing.
    pub(super) fn took(&mut self, rows: usize, full: &[i16], drained: bool, poll: Duration) {
        let more = !full.is_empty();
        // Partitions left out of this read keep what the last one said.
        self.hot.retain(|p| !self.limits.contains(p));
        self.hot.extend(full.iter().copied());
        let now = Instant::now();
        self.quiet = !more && rows == 0 && drained;
        self.at = if self.quiet {
            now + poll
        } else if more {
            now
        } else {
            now + BUSY_POLL
        };
    }

    /// The read failed: the next one in `wait`.
    pub(super) fn retry_in(&mut self, wait: Duration) {
        self.at = Instant::now() + wait;
    }

    /// The next read is due now (woken, or the partitions changed).
    pub(super) fn now(&mut self) {
        self.at = Instant::now();
    }
}

/// How many rows to read from each partition: each is topped up toward its share of the
/// window (`window` rows in all), counting the rows it has in hand (`held`), and the whole
/// read is cut to `asked` rows. The shares are even, except that once some partitions are
/// known to have more rows than the last read took (`hot`), the others' share is a few rows
/// and the hot ones share the rest: one key with a long backlog is read in long runs. A
/// partition whose keys drain slowly (one key, one message at the broker at a time) thus
/// does not fill the window while partitions of many keys go without. `turn` counts the
/// reads: it decides who goes first among partitions equally in need when there are more
/// of them than rows asked.
fn share(
    partitions: &[i16],
    hot: &HashSet<i16>,
    held: impl Fn(i16) -> usize,
    window: u32,
    asked: u32,
    turn: usize,
) -> Vec<(i16, u32)> {
    const COLD: u32 = 4;
    let n = partitions.len().max(1) as u32;
    let hot_n = partitions.iter().filter(|p| hot.contains(p)).count() as u32;
    let even = window.div_ceil(n).max(1);
    let target = |p: &i16| -> u32 {
        if hot_n == 0 || hot_n == n {
            return even;
        }
        let cold = even.min(COLD);
        if hot.contains(p) {
            (window.saturating_sub(cold * (n - hot_n)) / hot_n).max(cold)
        } else {
            cold
        }
    };
    // (partition, rows it may take, rows it holds)
    let mut limits: Vec<(i16, u32, usize)> = partitions
        .iter()
        .map(|p| {
            let in_hand = held(*p);
            let wanted = target(p).saturating_sub(u32::try_from(in_hand).unwrap_or(u32::MAX));
            (*p, wanted, in_hand)
        })
        .filter(|l| l.1 > 0)
        .collect();
    let total: u64 = limits.iter().map(|l| u64::from(l.1)).sum();
    if total > u64::from(asked) {
        // In proportion, rounded down; the rows left over go one each to the partitions
        // holding the fewest (among equals, starting at a partition that moves on with
        // every read, so that none is passed over for good), so that the read never takes
        // more than was asked.
        let wanted: Vec<u32> = limits.iter().map(|l| l.1).collect();
        for l in &mut limits {
            l.1 = (u64::from(l.1) * u64::from(asked) / total) as u32;
        }
        let mut left = asked - limits.iter().map(|l| l.1).sum::<u32>();
        let mut order: Vec<usize> = (0..limits.len()).collect();
        let n = limits.len();
        order.sort_by_key(|&i| (limits[i].2, (i + n - turn % n) % n));
        for i in order {
            if left == 0 {
                break;
            }
            if limits[i].1 < wanted[i] {
                limits[i].1 += 1;
                left -= 1;
            }
        }
    }
    limits
        .into_iter()
        .filter(|l| l.1 > 0)
        .map(|(p, n, _)| (p, n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_next_read_is_due_at_once_with_more_soon_while_busy_and_after_the_poll_when_quiet()
    {
        let poll = Duration::from_secs(1);
        let mut r = Reader::new();
        // Partition 3 had more rows than the read took: read again now, and it is hot.
        r.limits = vec![3, 4];
        r.took(500, &[3], false, poll);
        assert_eq!(r.at, Instant::now());
        assert!(r.hot.contains(&3) && !r.quiet);
        // Everything read, rows in hand: look again after a short busy poll.
        r.limits = vec![3];
        r.took(20, &[], false, poll);
        assert_eq!(r.at, Instant::now() + BUSY_POLL);
        assert!(
            !r.hot.contains(&3),
            "a partition read to its end is no longer hot"
        );
        // Nothing read and nothing held: quiet until the poll interval.
        tokio::time::advance(Duration::from_millis(7)).await;
        r.took(0, &[], true, poll);
        assert!(r.quiet);
        assert_eq!(r.at, Instant::now() + poll);
        r.now();
        assert_eq!(r.at, Instant::now());
    }

    #[test]
    fn a_hot_partition_gets_most_of_the_room() {
        let parts: Vec<i16> = (0..64).collect();
        let none = |_: i16| 0;
        let even = share(&parts, &HashSet::new(), none, 2048, 2048, 0);
        assert!(even.iter().all(|&(_, n)| n == 32), "{even:?}");
        let hot: HashSet<i16> = [5].into();
        let skewed = share(&parts, &hot, none, 2048, 2048, 0);
        let hot_limit = skewed.iter().find(|l| l.0 == 5).unwrap().1;
        assert_eq!(hot_limit, 2048 - 63 * 4);
        assert!(skewed.iter().filter(|l| l.0 != 5).all(|l| l.1 == 4));
        let all: HashSet<i16> = parts.iter().copied().collect();
        assert_eq!(share(&parts, &all, none, 2048, 2048, 0), even);
    }

    #[test]
    fn partitions_are_topped_up_to_their_share_and_the_read_is_cut_to_what_was_asked() {
        let parts: Vec<i16> = (0..4).collect();
        // Partition 0 has its whole share in hand, 1 half of it: 0 is not read at all.
        let held = |p: i16| match p {
            0 => 100,
            1 => 50,
            _ => 0,
        };
        let limits = share(&parts, &HashSet::new(), held, 400, 400, 0);
        assert_eq!(limits, vec![(1, 50), (2, 100), (3, 100)]);
        // Asked for less: every partition's part shrinks in proportion, none to nothing.
        let cut = share(&parts, &HashSet::new(), held, 400, 50, 0);
        assert_eq!(cut, vec![(1, 10), (2, 20), (3, 20)]);
        let total: u32 = cut.iter().map(|l| l.1).sum();
        assert!(total <= 50, "{cut:?}");
    }

    #[test]
    fn a_read_never_takes_more_rows_than_asked_and_the_starving_partitions_come_first() {
        // A window of one row over 64 partitions: one row, from a partition holding none.
        let parts: Vec<i16> = (0..64).collect();
        let held = |p: i16| usize::from(p < 10);
        let one = share(&parts, &HashSet::new(), held, 1, 1, 0);
        assert_eq!(one.len(), 1, "{one:?}");
        assert_eq!(one[0].1, 1);
        assert!(one[0].0 >= 10, "{one:?}");
        // Read after read, every partition equally in need gets its turn.
        let mut read: HashSet<i16> = HashSet::new();
        for turn in 0..64 {
            read.extend(
                share(&parts, &HashSet::new(), |_| 0, 1, 1, turn)
                    .iter()
                    .map(|l| l.0),
            );
        }
        assert_eq!(read.len(), 64, "{read:?}");
        // Whatever is held and asked, the read stays within what was asked.
        for asked in [1, 7, 63, 64, 65, 500, 2000] {
            for window in [1, 100, 2000] {
                let hot: HashSet<i16> = [3, 40].into();
                for h in [&HashSet::new(), &hot] {
                    let limits = share(&parts, h, |p| (p as usize * 7) % 5, window, asked, 5);
                    let total: u32 = limits.iter().map(|l| l.1).sum();
                    assert!(total <= asked, "asked {asked}, window {window}: {limits:?}");
                    assert!(limits.iter().all(|l| l.1 > 0), "{limits:?}");
                }
            }
        }
    }
}

//! KV block manager with prefix caching, after vLLM v1's block pool.
//!
//! - Fixed-size blocks, reference-counted; allocate and free are O(1).
//! - Free blocks sit in a doubly linked queue in eviction order (least recently freed first).
//!   A freed block keeps its content hash, so a later request with the same prefix can take it
//!   back out of the queue (a prefix-cache hit) until allocation evicts it.
//! - A full block is identified by a chained hash: `hash(parent hash, its token ids, extra
//!   keys)`, so equal hashes mean equal whole prefixes.
//! - [`BlockTable`] owns a sequence's blocks and frees them when dropped (RAII): a finished,
//!   cancelled or preempted sequence cannot leak blocks.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

/// Index of a KV block in the cache.
pub type BlockId = u32;

const NIL: u32 = u32::MAX;

/// Chained hash of a full block.
pub fn block_hash(parent: Option<u64>, tokens: &[u32], extra: u64) -> u64 {
    // SipHash with fixed keys: deterministic across runs, well mixed; a 64-bit collision between
    // two live prefixes is vanishingly unlikely at the block counts a cache holds.
    let mut h = std::hash::DefaultHasher::new();
    parent.unwrap_or(0x5157_5954_4348_5944).hash(&mut h);
    tokens.hash(&mut h);
    extra.hash(&mut h);
    h.finish()
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Blocks in the pool.
    pub total: usize,
    /// Blocks referenced by at least one sequence.
    pub used: usize,
    /// Full-block lookups made for new sequences.
    pub prefix_queries: u64,
    /// Of which found a cached block.
    pub prefix_hits: u64,
}

/// The pool's state; shared by the block tables that return blocks to it.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    ref_cnt: Vec<u32>,
    hash: Vec<Option<u64>>,
    cached: HashMap<u64, BlockId>,
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    free_count: usize,
    stats: PoolStats,
    prefix_caching: bool,
}

impl BlockPool {
    /// A pool of `num_blocks` blocks of `block_size` tokens.
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        let n = num_blocks as u32;
        let mut p = Self {
            block_size,
            ref_cnt: vec![0; num_blocks],
            hash: vec![None; num_blocks],
            cached: HashMap::new(),
            prev: (0..n).map(|i| if i == 0 { NIL } else { i - 1 }).collect(),
            next: (0..n)
                .map(|i| if i + 1 == n { NIL } else { i + 1 })
                .collect(),
            head: if n == 0 { NIL } else { 0 },
            tail: if n == 0 { NIL } else { n - 1 },
            free_count: num_blocks,
            stats: PoolStats {
                total: num_blocks,
                ..Default::default()
            },
            prefix_caching,
        };
        p.stats.used = 0;
        p
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks that can be allocated now (free, cached-but-unreferenced included).
    pub fn num_free(&self) -> usize {
        self.free_count
    }

    /// Current counters.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            used: self.stats.total - self.free_count,
            ..self.stats
        }
    }

    /// Reference count of a block (for invariant checks).
    pub fn ref_count(&self, b: BlockId) -> u32 {
        self.ref_cnt[b as usize]
    }

    fn unlink(&mut self, b: u32) {
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[b as usize] = NIL;
        self.next[b as usize] = NIL;
        self.free_count -= 1;
    }

    fn push_tail(&mut self, b: u32) {
        self.prev[b as usize] = self.tail;
        self.next[b as usize] = NIL;
        if self.tail == NIL {
            self.head = b;
        } else {
            self.next[self.tail as usize] = b;
        }
        self.tail = b;
        self.free_count += 1;
    }

    /// Takes the least recently freed block, evicting its cached content.
    fn allocate(&mut self) -> Option<BlockId> {
        if self.head == NIL {
            return None;
        }
        let b = self.head;
        self.unlink(b);
        if let Some(h) = self.hash[b as usize].take() {
            if self.cached.get(&h) == Some(&b) {
                self.cached.remove(&h);
            }
        }
        self.ref_cnt[b as usize] = 1;
        Some(b)
    }

    /// Takes another reference on a cached block (a prefix hit).
    fn touch(&mut self, b: BlockId) {
        if self.ref_cnt[b as usize] == 0 {
            self.unlink(b);
        }
        self.ref_cnt[b as usize] += 1;
    }

    fn release(&mut self, b: BlockId) {
        let r = &mut self.ref_cnt[b as usize];
        debug_assert!(*r > 0, "double free of block {b}");
        if *r == 0 {
            return;
        }
        *r -= 1;
        if *r == 0 {
            if self.prefix_caching && self.hash[b as usize].is_some() {
                self.push_tail(b);
            } else {
                // Uncached blocks are reused first: put them at the head.
                self.hash[b as usize] = None;
                let old = self.head;
                self.prev[b as usize] = NIL;
                self.next[b as usize] = old;
                if old == NIL {
                    self.tail = b;
                } else {
                    self.prev[old as usize] = b;
                }
                self.head = b;
                self.free_count += 1;
            }
        }
    }

    fn register(&mut self, b: BlockId, h: u64) {
        if !self.prefix_caching || self.hash[b as usize].is_some() {
            return;
        }
        self.hash[b as usize] = Some(h);
        self.cached.entry(h).or_insert(b);
    }
}

/// Shared handle to a pool.
#[derive(Debug, Clone)]
pub struct SharedPool(Arc<Mutex<BlockPool>>);

impl SharedPool {
    /// Wraps a pool.
    pub fn new(pool: BlockPool) -> Self {
        Self(Arc::new(Mutex::new(pool)))
    }

    /// Locks the pool (never poisoned in practice: nothing panics while holding it).
    pub fn lock(&self) -> MutexGuard<'_, BlockPool> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The blocks of one sequence. Dropping it releases them.
#[derive(Debug)]
pub struct BlockTable {
    pool: SharedPool,
    blocks: Vec<BlockId>,
    /// Chained hashes of the leading full blocks that have been registered.
    hashes: Vec<u64>,
    extra: u64,
}

impl BlockTable {
    /// An empty table; `extra` is mixed into every block hash (e.g. a LoRA or cache salt).
    pub fn new(pool: SharedPool, extra: u64) -> Self {
        Self {
            pool,
            blocks: Vec::new(),
            hashes: Vec::new(),
            extra,
        }
    }

    /// Block ids, in position order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Claims cached blocks for the longest cached prefix of `tokens`, leaving at least one token
    /// to compute (the model must produce logits for the last one). Returns the number of
    /// tokens covered. Only valid on an empty table.
    pub fn claim_prefix(&mut self, tokens: &[u32]) -> usize {
        debug_assert!(self.blocks.is_empty());
        let mut pool = self.pool.lock();
        if !pool.prefix_caching {
            return 0;
        }
        let bs = pool.block_size;
        let max_blocks = tokens.len().saturating_sub(1) / bs;
        let mut parent = None;
        for i in 0..max_blocks {
            let h = block_hash(parent, &tokens[i * bs..(i + 1) * bs], self.extra);
            match pool.cached.get(&h).copied() {
                Some(b) => {
                    pool.touch(b);
                    self.blocks.push(b);
                    self.hashes.push(h);
                    parent = Some(h);
                }
                None => break,
            }
        }
        // Hit rate is per full prompt block.
        pool.stats.prefix_queries += max_blocks as u64;
        pool.stats.prefix_hits += self.blocks.len() as u64;
        self.blocks.len() * bs
    }

    /// Makes room for `n_tokens` tokens in total. Returns false (allocating nothing) when the
    /// pool does not have enough free blocks.
    pub fn ensure_capacity(&mut self, n_tokens: usize) -> bool {
        let mut pool = self.pool.lock();
        let need = n_tokens
            .div_ceil(pool.block_size)
            .saturating_sub(self.blocks.len());
        if need > pool.num_free() {
            return false;
        }
        for _ in 0..need {
            let b = pool.allocate().expect("checked free count");
            self.blocks.push(b);
        }
        true
    }

    /// Blocks needed beyond the current ones to hold `n_tokens`.
    pub fn blocks_needed(&self, n_tokens: usize, block_size: usize) -> usize {
        n_tokens
            .div_ceil(block_size)
            .saturating_sub(self.blocks.len())
    }

    /// Registers the hashes of blocks that became full now that `computed` tokens of `tokens`
    /// are in the cache, so later sequences can reuse them.
    pub fn commit(&mut self, tokens: &[u32], computed: usize) {
        let mut pool = self.pool.lock();
        let bs = pool.block_size;
        let full = (computed / bs).min(self.blocks.len());
        while self.hashes.len() < full {
            let i = self.hashes.len();
            let h = block_hash(
                self.hashes.last().copied(),
                &tokens[i * bs..(i + 1) * bs],
                self.extra,
            );
            pool.register(self.blocks[i], h);
            self.hashes.push(h);
        }
    }

    /// Releases every block (also done on drop).
    pub fn clear(&mut self) {
        let mut pool = self.pool.lock();
        // Tail blocks first: they are the least likely to be shared, so evict them first.
        for &b in self.blocks.iter().rev() {
            pool.release(b);
        }
        self.blocks.clear();
        self.hashes.clear();
    }
}

impl Drop for BlockTable {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefix_blocks_are_shared_and_survive_until_evicted() {
        let pool = SharedPool::new(BlockPool::new(8, 4, true));
        let prompt: Vec<u32> = (0..13).collect();
        let mut a = BlockTable::new(pool.clone(), 0);
        assert_eq!(a.claim_prefix(&prompt), 0);
        assert!(a.ensure_capacity(13));
        a.commit(&prompt, 13);
        let mut b = BlockTable::new(pool.clone(), 0);
        // 3 full blocks cached; the 13th token is left to compute.
        assert_eq!(b.claim_prefix(&prompt), 12);
        assert_eq!(&b.blocks()[..3], &a.blocks()[..3]);
        assert_eq!(pool.lock().ref_count(a.blocks()[0]), 2);
        drop(a);
        drop(b);
        assert_eq!(pool.lock().num_free(), 8);
        // Freed but cached: a third sequence still hits.
        let mut c = BlockTable::new(pool.clone(), 0);
        assert_eq!(c.claim_prefix(&prompt), 12);
        // Different extra key → different hashes → no hit.
        let mut d = BlockTable::new(pool.clone(), 7);
        assert_eq!(d.claim_prefix(&prompt), 0);
        c.clear();
        // Allocating everything evicts the cached blocks.
        assert!(d.ensure_capacity(32));
        let mut e = BlockTable::new(pool.clone(), 0);
        drop(d);
        assert_eq!(e.claim_prefix(&prompt), 0);
    }

    #[test]
    fn refuses_when_full_without_partial_allocation() {
        let pool = SharedPool::new(BlockPool::new(2, 4, false));
        let mut a = BlockTable::new(pool.clone(), 0);
        assert!(!a.ensure_capacity(9));
        assert!(a.blocks().is_empty());
        assert!(a.ensure_capacity(8));
        assert_eq!(pool.lock().num_free(), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        New(Vec<u32>),
        Grow(usize, usize),
        Drop(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            prop::collection::vec(0u32..4, 1..40).prop_map(Op::New),
            (0usize..8, 1usize..12).prop_map(|(i, n)| Op::Grow(i, n)),
            (0usize..8).prop_map(Op::Drop),
        ]
    }

    proptest! {
        /// Under random arrivals, growth and departures: refcounts equal the number of tables
        /// holding each block, free + referenced = total, nothing leaks after all are dropped.
        #[test]
        fn refcounts_stay_consistent(ops in prop::collection::vec(op(), 1..80)) {
            let total = 24;
            let pool = SharedPool::new(BlockPool::new(total, 4, true));
            let mut live: Vec<(BlockTable, Vec<u32>, usize)> = Vec::new();
            for o in ops {
                match o {
                    Op::New(toks) => {
                        let mut t = BlockTable::new(pool.clone(), 0);
                        let hit = t.claim_prefix(&toks);
                        prop_assert!(hit < toks.len());
                        if t.ensure_capacity(toks.len()) {
                            t.commit(&toks, toks.len());
                            live.push((t, toks, 0));
                        }
                    }
                    Op::Grow(i, n) if !live.is_empty() => {
                        let i = i % live.len();
                        let (t, toks, _) = &mut live[i];
                        let extra: Vec<u32> = (0..n as u32).collect();
                        let want = toks.len() + extra.len();
                        if t.ensure_capacity(want) {
                            toks.extend(extra);
                            t.commit(toks, toks.len());
                        }
                    }
                    Op::Drop(i) if !live.is_empty() => {
                        let i = i % live.len();
                        live.swap_remove(i);
                    }
                    _ => {}
                }
                let p = pool.lock();
                let mut count = vec![0u32; total];
                for (t, _, _) in &live {
                    for &b in t.blocks() {
                        count[b as usize] += 1;
                    }
                }
                let referenced = count.iter().filter(|&&c| c > 0).count();
                for (b, &c) in count.iter().enumerate() {
                    prop_assert_eq!(p.ref_count(b as u32), c);
                }
                prop_assert_eq!(p.num_free() + referenced, total);
            }
            live.clear();
            prop_assert_eq!(pool.lock().num_free(), total);
        }
    }
}

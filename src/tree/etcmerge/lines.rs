//! Line-based three-way merge of file contents (diff3 over Myers matching).

use std::collections::HashMap;

use super::*;

/// Outcome of [`merge_lines`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineMerge {
    /// Both sides' changes applied; the merged bytes.
    Clean(Vec<u8>),
    /// Some regions were changed differently on both sides.
    Conflict {
        /// Number of conflicting regions.
        hunks: usize,
    },
}

/// Three-way merge of `local` and `vendor`, both derived from `base`, line by
/// line (diff3 semantics: changes to the same or to adjacent lines conflict
/// unless they are identical). Works on bytes; a missing final newline is
/// part of the last line.
pub fn merge_lines(base: &[u8], local: &[u8], vendor: &[u8]) -> LineMerge {
    let (b, l, v) = (split_lines(base), split_lines(local), split_lines(vendor));
    let mut ids = HashMap::new();
    let bi = intern(&mut ids, &b);
    let li = intern(&mut ids, &l);
    let vi = intern(&mut ids, &v);
    let regions = merge_regions(&bi, &li, &vi);
    let mut out = Vec::new();
    let mut hunks = 0;
    for r in regions {
        match r {
            Region::Base(s, e) => b[s..e].iter().for_each(|x| out.extend_from_slice(x)),
            Region::Local(s, e) => l[s..e].iter().for_each(|x| out.extend_from_slice(x)),
            Region::Vendor(s, e) => v[s..e].iter().for_each(|x| out.extend_from_slice(x)),
            Region::Conflict => hunks += 1,
        }
    }
    if hunks == 0 {
        LineMerge::Clean(out)
    } else {
        LineMerge::Conflict { hunks }
    }
}

/// Maps equal lines to equal numbers (shared across the three inputs).
pub(super) fn intern<'a>(ids: &mut HashMap<&'a [u8], u32>, lines: &[&'a [u8]]) -> Vec<u32> {
    lines
        .iter()
        .map(|line| {
            let next = ids.len() as u32;
            *ids.entry(*line).or_insert(next)
        })
        .collect()
}

/// Splits after each `\n`; the last line may lack it.
pub(super) fn split_lines(data: &[u8]) -> Vec<&[u8]> {
    data.split_inclusive(|&c| c == b'\n').collect()
}

/// A piece of the merge result: a range of one input's lines, or a conflict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Region {
    Base(usize, usize),
    Local(usize, usize),
    Vendor(usize, usize),
    Conflict,
}

/// Runs of equal lines: (start in a, start in b, length).
pub(super) type Blocks = Vec<(usize, usize, usize)>;

/// The diff3 merge proper (the sync-region formulation of bzr's merge3):
/// regions where base, local and vendor all agree are kept; between them
/// the side that changed wins, identical changes are taken once, and
/// different changes conflict.
pub(super) fn merge_regions(base: &[u32], a: &[u32], b: &[u32]) -> Vec<Region> {
    let mut out = Vec::new();
    let (mut iz, mut ia, mut ib) = (0, 0, 0);
    for (zs, ze, as_, ae, bs, be) in sync_regions(base, a, b) {
        if as_ > ia || bs > ib {
            let equal_a = base[iz..zs] == a[ia..as_];
            let equal_b = base[iz..zs] == b[ib..bs];
            if a[ia..as_] == b[ib..bs] {
                out.push(Region::Local(ia, as_));
            } else if equal_a {
                out.push(Region::Vendor(ib, bs));
            } else if equal_b {
                out.push(Region::Local(ia, as_));
            } else {
                out.push(Region::Conflict);
            }
        }
        if ze > zs {
            out.push(Region::Base(zs, ze));
        }
        (iz, ia, ib) = (ze, ae, be);
    }
    out
}

/// Regions where all three agree, as (base start, base end, a start, a end,
/// b start, b end), ending with an empty region at the ends of all three.
pub(super) fn sync_regions(
    base: &[u32],
    a: &[u32],
    b: &[u32],
) -> Vec<(usize, usize, usize, usize, usize, usize)> {
    let am = matching_blocks(base, a);
    let bm = matching_blocks(base, b);
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < am.len() && j < bm.len() {
        let (abase, amatch, alen) = am[i];
        let (bbase, bmatch, blen) = bm[j];
        let start = abase.max(bbase);
        let end = (abase + alen).min(bbase + blen);
        if start < end {
            let asub = amatch + (start - abase);
            let bsub = bmatch + (start - bbase);
            let len = end - start;
            out.push((start, end, asub, asub + len, bsub, bsub + len));
        }
        if abase + alen < bbase + blen {
            i += 1;
        } else {
            j += 1;
        }
    }
    out.push((base.len(), base.len(), a.len(), a.len(), b.len(), b.len()));
    out
}

/// Matching blocks of a longest common subsequence of `a` and `b`.
pub(super) fn matching_blocks(a: &[u32], b: &[u32]) -> Blocks {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (am, bm) = (&a[prefix..a.len() - suffix], &b[prefix..b.len() - suffix]);
    let mut pairs: Vec<(usize, usize)> = (0..prefix).map(|i| (i, i)).collect();
    pairs.extend(
        myers_pairs(am, bm)
            .into_iter()
            .map(|(x, y)| (x + prefix, y + prefix)),
    );
    pairs.extend((0..suffix).map(|k| (a.len() - suffix + k, b.len() - suffix + k)));
    let mut blocks: Blocks = Vec::new();
    for (x, y) in pairs {
        match blocks.last_mut() {
            Some((bx, by, len)) if *bx + *len == x && *by + *len == y => *len += 1,
            _ => blocks.push((x, y, 1)),
        }
    }
    blocks
}

/// Index pairs of equal elements along a shortest edit script (Myers 1986).
/// Past [`MAX_EDIT_DISTANCE`] edits, gives up and matches nothing.
pub(super) fn myers_pairs(a: &[u32], b: &[u32]) -> Vec<(usize, usize)> {
    let (n, m) = (a.len() as isize, b.len() as isize);
    let max = (n + m) as usize;
    let limit = max.min(MAX_EDIT_DISTANCE) as isize;
    let off = max as isize + 1;
    let mut v = vec![0isize; 2 * max + 3];
    // trace[d][k + d] = furthest x on diagonal k after d edits.
    let mut trace: Vec<Vec<u32>> = Vec::new();
    let mut found = None;
    let at = |k: isize| (k + off) as usize;
    for d in 0..=limit {
        for k in (-d..=d).step_by(2) {
            let mut x = if d == 0 {
                0
            } else if k == -d || (k != d && v[at(k - 1)] < v[at(k + 1)]) {
                v[at(k + 1)]
            } else {
                v[at(k - 1)] + 1
            };
            let mut y = x - k;
            while x < n && y < m && a[x as usize] == b[y as usize] {
                x += 1;
                y += 1;
            }
            v[at(k)] = x;
            if x >= n && y >= m {
                found = Some(d);
                break;
            }
        }
        trace.push(v[at(-d)..=at(d)].iter().map(|&x| x as u32).collect());
        if found.is_some() {
            break;
        }
    }
    let Some(dmax) = found else {
        return Vec::new();
    };
    let (mut x, mut y) = (n, m);
    let mut pairs = Vec::new();
    for d in (1..=dmax).rev() {
        let prev = &trace[(d - 1) as usize];
        let get = |k: isize| prev[(k + d - 1) as usize] as isize;
        let k = x - y;
        let prev_k = if k == -d || (k != d && get(k - 1) < get(k + 1)) {
            k + 1
        } else {
            k - 1
        };
        let prev_x = get(prev_k);
        let prev_y = prev_x - prev_k;
        while x > prev_x && y > prev_y {
            x -= 1;
            y -= 1;
            pairs.push((x as usize, y as usize));
        }
        (x, y) = (prev_x, prev_y);
    }
    while x > 0 && y > 0 {
        x -= 1;
        y -= 1;
        pairs.push((x as usize, y as usize));
    }
    pairs.reverse();
    pairs
}

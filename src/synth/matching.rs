//! Optimal one-to-one matching (the Hungarian algorithm), for scoring decoders against true
//! features.

/// The assignment of rows to distinct columns of the R×C score matrix `score_rc` (row-major,
/// R ≤ C) that maximises the total score: `result[r]` is row r's column.
///
/// Kuhn–Munkres with row and column potentials (the O(R²·C) shortest-augmenting-path form):
/// each row in turn is added and the cheapest augmenting path to a free column found with a
/// Dijkstra-like sweep over reduced costs. Scores are negated into costs; f64 throughout, so
/// float32 cosines never tie by rounding alone.
///
/// `None` when a score is NaN or ±Inf: the sweep compares reduced costs with `<`, which NaN
/// never passes, so no column would ever be reached and the search would not end.
pub fn max_weight_matching(score_rc: &[f64], rows: usize, cols: usize) -> Option<Vec<usize>> {
    assert!(rows <= cols, "matching needs rows ≤ columns");
    assert_eq!(score_rc.len(), rows * cols);
    if score_rc.iter().any(|s| !s.is_finite()) {
        return None;
    }
    let cost = |r: usize, c: usize| -score_rc[r * cols + c];
    // Potentials u (rows) and v (columns), 1-based with index 0 a virtual row/column, as the
    // classic formulation: owner[c] is the row matched to column c (0 = free).
    let mut u = vec![0.0f64; rows + 1];
    let mut v = vec![0.0f64; cols + 1];
    let mut owner = vec![0usize; cols + 1];
    let mut way = vec![0usize; cols + 1];
    let mut min_to = vec![0.0f64; cols + 1];
    let mut used = vec![false; cols + 1];
    for r in 1..=rows {
        owner[0] = r;
        let mut c0 = 0;
        min_to.fill(f64::INFINITY);
        used.fill(false);
        loop {
            used[c0] = true;
            let r0 = owner[c0];
            let mut delta = f64::INFINITY;
            let mut c1 = 0;
            for c in 1..=cols {
                if used[c] {
                    continue;
                }
                let reduced = cost(r0 - 1, c - 1) - u[r0] - v[c];
                if reduced < min_to[c] {
                    min_to[c] = reduced;
                    way[c] = c0;
                }
                if min_to[c] < delta {
                    delta = min_to[c];
                    c1 = c;
                }
            }
            for c in 0..=cols {
                if used[c] {
                    u[owner[c]] += delta;
                    v[c] -= delta;
                } else {
                    min_to[c] -= delta;
                }
            }
            if c1 == 0 {
                // No column reached: only possible with non-finite costs, refused above.
                return None;
            }
            c0 = c1;
            if owner[c0] == 0 {
                break;
            }
        }
        // Flip the augmenting path back to the virtual column.
        loop {
            let prev = way[c0];
            owner[c0] = owner[prev];
            c0 = prev;
            if c0 == 0 {
                break;
            }
        }
    }
    let mut result = vec![0; rows];
    for c in 1..=cols {
        if owner[c] != 0 {
            result[owner[c] - 1] = c - 1;
        }
    }
    Some(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every assignment of `rows` rows to distinct columns, by brute force.
    fn best_by_brute_force(score: &[f64], rows: usize, cols: usize) -> f64 {
        fn go(r: usize, rows: usize, cols: usize, score: &[f64], taken: &mut [bool]) -> f64 {
            if r == rows {
                return 0.0;
            }
            let mut best = f64::NEG_INFINITY;
            for c in 0..cols {
                if !taken[c] {
                    taken[c] = true;
                    best = best.max(score[r * cols + c] + go(r + 1, rows, cols, score, taken));
                    taken[c] = false;
                }
            }
            best
        }
        go(0, rows, cols, score, &mut vec![false; cols])
    }

    #[test]
    fn greedy_is_not_optimal_but_the_matching_is() {
        // Greedy takes (0, 0) = 0.9 and leaves row 1 with 0.1; the optimum is 0.8 + 0.85.
        let score = [0.9, 0.8, 0.85, 0.1];
        let m = max_weight_matching(&score, 2, 2).unwrap();
        assert_eq!(m, vec![1, 0]);
    }

    #[test]
    fn matches_brute_force_on_random_rectangles() {
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        for (rows, cols) in [(1, 1), (3, 3), (4, 6), (5, 7), (6, 6), (2, 8)] {
            for _ in 0..20 {
                let score: Vec<f64> = (0..rows * cols).map(|_| next()).collect();
                let m = max_weight_matching(&score, rows, cols).unwrap();
                let mut seen = m.clone();
                seen.sort_unstable();
                seen.dedup();
                assert_eq!(seen.len(), rows, "columns must be distinct: {m:?}");
                let total: f64 = m
                    .iter()
                    .enumerate()
                    .map(|(r, &c)| score[r * cols + c])
                    .sum();
                let best = best_by_brute_force(&score, rows, cols);
                assert!(
                    (total - best).abs() < 1e-12,
                    "{total} vs {best} at {rows}×{cols}"
                );
            }
        }
    }

    #[test]
    fn non_finite_scores_are_refused_rather_than_searched_forever() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let score = [0.5, bad, 0.25, 0.75];
            assert_eq!(max_weight_matching(&score, 2, 2), None, "{bad}");
        }
    }
}

"""Dynamic time warping: the alignment MCD uses, and the one that puts a generated waveform on the reference's
timeline when their lengths differ (STOI and PESQ compare sample-aligned signals)."""
from __future__ import annotations

import numpy as np


def dtw_path(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost monotonic path through `cost` [N, M] with steps (1,0), (0,1), (1,1), from (0,0) to (N-1,M-1).
    Returns [L, 2] index pairs. Each row is solved at once: D[i, j] = S[j] + min_{k<=j}(a[k] - S[k]) where
    a = cost[i] + min(D[i-1, j-1], D[i-1, j]) and S is the running sum of cost[i]."""
    n, m = cost.shape
    acc = np.empty((n, m))
    acc[0] = np.cumsum(cost[0])
    for i in range(1, n):
        prev = acc[i - 1]
        from_above = np.concatenate(([prev[0]], np.minimum(prev[1:], prev[:-1])))
        a = cost[i] + from_above
        running = np.cumsum(cost[i])
        acc[i] = running + np.minimum.accumulate(a - running)
    i, j, path = n - 1, m - 1, [(n - 1, m - 1)]
    while i > 0 or j > 0:
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        else:
            step = int(np.argmin((acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])))
            i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
        path.append((i, j))
    return np.array(path[::-1])


def pairwise_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance between every row of a [N, D] and b [M, D]."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
    return np.sqrt(np.maximum(sq, 0))


def warp_to_reference(generated: np.ndarray, gen_feats: np.ndarray, ref_feats: np.ndarray, ref_len: int,
                      hop: int) -> np.ndarray:
    """Re-time `generated` onto the reference timeline: for every reference frame (hop samples) take the generated
    frame DTW matched to it and overlap-add Hann-windowed 2*hop frames (50 % overlap sums to one)."""
    path = dtw_path(pairwise_distance(ref_feats, gen_feats))
    match = np.zeros(len(ref_feats), dtype=int)
    match[path[:, 0]] = path[:, 1]  # the last generated frame matched to each reference frame
    match = np.append(match, min(match[-1] + 1, len(gen_feats)))  # the frame after the last covers the tail
    window = np.hanning(2 * hop + 1)[:-1]  # periodic Hann: shifted copies at hop sum to exactly 1
    padded = np.pad(generated, (hop, 3 * hop))
    out = np.zeros(ref_len + 4 * hop)
    for k, g in enumerate(match):
        out[k * hop:k * hop + 2 * hop] += window * padded[g * hop:g * hop + 2 * hop]
    return out[hop:hop + ref_len]

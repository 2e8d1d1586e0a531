import itertools
import math

import numpy as np
import pytest
import torch

from vop.engine.metrics import (
    dual_softmax,
    qb_norm,
    rank_metrics,
    retrieval_metrics,
    similarity_chunked,
    t2v_ranks,
    v2t_ranks,
)


# --- independent reference: plain loops, counting only (no sorting, no numpy ranking) ----------

def _tie_expectation(higher, tied_wrong, tied_own, ks=(1, 5, 10)):
    """Enumerate every equally likely placement of the ``tied_own`` correct items in a shuffled
    block of ``tied_own + tied_wrong`` tied items: P(first correct within k) and its expected rank."""
    n = tied_own + tied_wrong
    placements = list(itertools.combinations(range(n), tied_own))
    firsts = [higher + 1 + min(c) for c in placements]
    return {k: sum(f <= k for f in firsts) / len(firsts) for k in ks}, sum(firsts) / len(firsts)


def brute_force(sim, text_to_video=None):
    """Plain loops and counting. Returns (expected metrics, optimistic t2v ranks, optimistic v2t ranks)."""
    sim = [[float(x) for x in row] for row in np.asarray(sim)]
    n_text, n_video = len(sim), len(sim[0])
    t2v = list(range(n_text)) if text_to_video is None else [int(v) for v in text_to_video]
    t2v_ranks_, t2v_exp = [], []
    for i in range(n_text):
        gt = sim[i][t2v[i]]
        higher = sum(1 for j in range(n_video) if sim[i][j] > gt)
        tied = sum(1 for j in range(n_video) if j != t2v[i] and sim[i][j] == gt)
        t2v_ranks_.append(1 + higher)
        t2v_exp.append(_tie_expectation(higher, tied, 1))
    v2t_ranks_, v2t_exp = [], []
    for v in range(n_video):
        best = max(sim[i][v] for i in range(n_text) if t2v[i] == v)
        higher = sum(1 for i in range(n_text) if sim[i][v] > best)
        own = sum(1 for i in range(n_text) if t2v[i] == v and sim[i][v] == best)
        wrong = sum(1 for i in range(n_text) if t2v[i] != v and sim[i][v] == best)
        v2t_ranks_.append(1 + higher)
        v2t_exp.append(_tie_expectation(higher, wrong, own))
    return {"t2v": summarise(t2v_exp), "v2t": summarise(v2t_exp)}, t2v_ranks_, v2t_ranks_


def summarise(queries):
    """``queries``: (hit probabilities by k, expected rank) per query, or plain integer ranks."""
    queries = [q if isinstance(q, tuple) else ({k: float(q <= k) for k in (1, 5, 10)}, q) for q in queries]
    n = len(queries)
    out = {f"R{k}": 100.0 * sum(hit[k] for hit, _ in queries) / n for k in (1, 5, 10)}
    ranks = [r for _, r in queries]
    ordered = []  # selection by counting: the m-th smallest is the r with #{< r} <= m < #{<= r}
    for m in range(n):
        ordered.append(next(r for r in ranks if sum(x < r for x in ranks) <= m < sum(x <= r for x in ranks)))
    out["MdR"] = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    out["MnR"] = sum(ranks) / n
    return out


def assert_same(got, want):
    assert got.keys() == want.keys() == {"t2v", "v2t"}
    for d in ("t2v", "v2t"):
        assert got[d].keys() == want[d].keys()
        for key in want[d]:
            assert isinstance(got[d][key], float)
            assert got[d][key] == pytest.approx(want[d][key], abs=1e-9), (d, key)


def covering_index(n_text, n_video, gen):
    idx = torch.cat([torch.randperm(n_video, generator=gen), torch.randint(0, n_video, (n_text - n_video,), generator=gen)])
    return idx[torch.randperm(n_text, generator=gen)]


# --- metrics ------------------------------------------------------------------------------------

def test_hand_computed_3x3():
    sim = torch.tensor([[0.9, 0.1, 0.2],
                        [0.8, 0.5, 0.1],
                        [0.3, 0.6, 0.7]])
    # t2v: text0 rank 1, text1 rank 2 (0.8 > 0.5), text2 rank 1.
    # v2t: video0 rank 1, video1 rank 2 (text2's 0.6 > text1's 0.5), video2 rank 1.
    assert t2v_ranks(sim).tolist() == [1, 2, 1]
    assert v2t_ranks(sim).tolist() == [1, 2, 1]
    m = retrieval_metrics(sim)
    assert m["t2v"] == pytest.approx({"R1": 200 / 3, "R5": 100.0, "R10": 100.0, "MdR": 1.0, "MnR": 4 / 3})
    assert m["v2t"] == m["t2v"]


def test_hand_computed_multi_caption_and_ties():
    # 4 captions, 2 videos: captions 0,1 describe video 0; captions 2,3 describe video 1.
    sim = torch.tensor([[0.2, 0.9],   # caption 0: its video 0 is second -> rank 2
                        [0.7, 0.7],   # caption 1: tied with the wrong video -> rank 1 or 2, a coin flip
                        [0.1, 0.3],   # caption 2: rank 1
                        [0.8, 0.4]])  # caption 3: rank 2
    idx = [0, 0, 1, 1]
    assert t2v_ranks(sim, idx).tolist() == [2, 1, 1, 2]  # optimistic ranks
    ranks, tied = t2v_ranks(sim, idx, ties=True)
    assert tied.tolist() == [0, 1, 0, 0]
    # video 0 column [0.2, 0.7, 0.1, 0.8]: best own caption 0.7 (caption 1), caption 3's 0.8 above -> 2.
    # video 1 column [0.9, 0.7, 0.3, 0.4]: best own caption 0.4, captions 0 and 1 above -> 3.
    assert v2t_ranks(sim, idx).tolist() == [2, 3]
    m = retrieval_metrics(sim, np.array(idx))
    # t2v expected ranks [2, 1.5, 1, 2]: R@1 = (0 + 0.5 + 1 + 0) / 4
    assert m["t2v"] == pytest.approx({"R1": 37.5, "R5": 100.0, "R10": 100.0, "MdR": 1.75, "MnR": 1.625})
    assert m["v2t"] == pytest.approx({"R1": 0.0, "R5": 100.0, "R10": 100.0, "MdR": 2.5, "MnR": 2.5})


def test_constant_matrix_is_chance_not_perfect():
    # a collapsed model scores everything equally: every metric is what random ranking would give
    m = retrieval_metrics(torch.zeros(5, 5))
    assert m["t2v"] == pytest.approx({"R1": 20.0, "R5": 100.0, "R10": 100.0, "MdR": 3.0, "MnR": 3.0})
    assert m["v2t"] == m["t2v"]
    assert t2v_ranks(torch.zeros(5, 5)).tolist() == [1] * 5


def test_identical_twins_are_a_coin_flip():
    # two gallery videos a model cannot tell apart (a video and its reversed copy under frame
    # averaging): each of their captions scores both the same -> R@1 50%, not 100%
    sim = torch.tensor([[0.9, 0.9, 0.1], [0.8, 0.8, 0.2], [0.1, 0.2, 0.7]])
    m = retrieval_metrics(sim)
    assert m["t2v"]["R1"] == pytest.approx(100 * (0.5 + 0.5 + 1) / 3)
    # a model that separates them, even by a hair, gets exact ranks
    sim[0, 1] = 0.89
    sim[1, 0] = 0.79
    assert retrieval_metrics(sim)["t2v"]["R1"] == 100.0


def test_multi_caption_tie_probability():
    # video 0 has 2 captions tied with 3 captions of other videos at its best score: P(hit@1) = 2/5,
    # P(hit@2) = 1 - C(3,2)/C(5,2) = 0.7; expected rank 1 + 3/3 = 2
    sim = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.5], [1.0, 0.5], [1.0, 0.9]])
    idx = [0, 0, 1, 1, 1]
    ranks, tied, own = v2t_ranks(sim, idx, ties=True)
    assert (ranks[0], tied[0], own[0]) == (1, 3, 2)
    m = rank_metrics(ranks[:1], (1, 2), tied[:1], own[:1])
    assert m == pytest.approx({"R1": 40.0, "R2": 70.0, "MdR": 2.0, "MnR": 2.0})


@pytest.mark.parametrize("seed", range(3))
def test_random_square_matches_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    sim = torch.randn(40, 40, generator=gen)
    sim += 2.0 * torch.eye(40) * torch.rand(40, generator=gen)  # spread ranks over 1..many
    want, _, _ = brute_force(sim)
    for chunk in (1, 7, 1024):
        assert_same(retrieval_metrics(sim, chunk=chunk), want)
    assert_same(retrieval_metrics(sim.numpy()), want)  # numpy input
    assert_same(retrieval_metrics(sim.double()), want)


@pytest.mark.parametrize("seed", range(3))
def test_random_multi_caption_matches_brute_force(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    n_text, n_video = 57, 13
    idx = covering_index(n_text, n_video, gen)
    sim = torch.randn(n_text, n_video, generator=gen)
    sim[torch.arange(n_text), idx] += torch.rand(n_text, generator=gen) * 2
    want, t_ranks, v_ranks = brute_force(sim, idx)
    assert t2v_ranks(sim, idx, chunk=5).tolist() == t_ranks
    assert v2t_ranks(sim, idx, chunk=5).tolist() == v_ranks
    for chunk in (1, 10, 1024):
        assert_same(retrieval_metrics(sim, idx, chunk=chunk), want)
    assert_same(retrieval_metrics(sim.numpy(), idx.numpy()), want)


@pytest.mark.parametrize("seed", range(3))
def test_ties_match_brute_force(seed):
    gen = torch.Generator().manual_seed(200 + seed)
    n_text, n_video = 30, 12
    idx = covering_index(n_text, n_video, gen)
    sim = torch.round(torch.rand(n_text, n_video, generator=gen) * 4) / 4  # 5 distinct values
    sim[3] = sim[7]          # duplicated rows
    sim[:, 2] = sim[:, 5]    # duplicated columns
    want, t_ranks, v_ranks = brute_force(sim, idx)
    assert t2v_ranks(sim, idx, chunk=4).tolist() == t_ranks
    assert v2t_ranks(sim, idx, chunk=4).tolist() == v_ranks
    assert_same(retrieval_metrics(sim, idx, chunk=4), want)
    square = torch.round(torch.randn(25, 25, generator=gen))
    assert_same(retrieval_metrics(square), brute_force(square)[0])


def test_rank_metrics_median_and_mean():
    m = rank_metrics([1, 2, 3, 10])
    assert m == {"R1": 25.0, "R5": 75.0, "R10": 100.0, "MdR": 2.5, "MnR": 4.0}
    assert rank_metrics(torch.tensor([3, 1, 2]))["MdR"] == 2.0


def test_input_errors():
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(torch.randn(4, 3), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="text_to_video"):
        retrieval_metrics(torch.randn(4, 3))
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(torch.randn(3, 3), [0, 1, 3])
    with pytest.raises(ValueError, match="integers"):
        retrieval_metrics(torch.randn(3, 3), [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


# --- chunked similarity -------------------------------------------------------------------------

def test_similarity_chunked_equals_matmul():
    gen = torch.Generator().manual_seed(0)
    t, v = torch.randn(53, 16, generator=gen), torch.randn(21, 16, generator=gen)
    want = t @ v.T
    for chunk in (1, 8, 53, 1000):
        got = similarity_chunked(t, v, chunk=chunk)
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(similarity_chunked(t.numpy(), v.double().numpy(), chunk=10), want)
    torch.testing.assert_close(similarity_chunked(t.half(), v.half()), t.half().float() @ v.half().float().T)
    with pytest.raises(ValueError):
        similarity_chunked(t, torch.randn(4, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU path of similarity_chunked)")
def test_similarity_chunked_from_gpu_returns_cpu():
    t, v = torch.randn(300, 64), torch.randn(70, 64)
    got = similarity_chunked(t.cuda(), v.cuda(), chunk=64)
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, t @ v.T, atol=1e-4, rtol=1e-4)


# --- DSL ----------------------------------------------------------------------------------------

def test_dual_softmax_hand_example():
    sim = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    e = math.e
    want = torch.tensor([[e / (e + 1), 0.0], [0.0, e / (e + 1)]])
    torch.testing.assert_close(dual_softmax(sim, temperature=1.0, dim=0), want)
    torch.testing.assert_close(dual_softmax(sim, temperature=1.0, dim=1), want)
    # dim=1 is dim=0 of the transpose
    s = torch.randn(5, 3)
    torch.testing.assert_close(dual_softmax(s, 7.0, dim=1), dual_softmax(s.T, 7.0, dim=0).T)


def test_dual_softmax_limits_and_hub_suppression():
    gen = torch.Generator().manual_seed(1)
    sim = torch.rand(6, 4, generator=gen) + 0.1  # positive scores
    out = dual_softmax(sim.numpy(), 1e-9)  # numpy accepted; temperature -> 0: uniform softmax
    assert out.shape == sim.shape
    torch.testing.assert_close(out, sim / 6)
    # temperature -> inf: each video keeps only its best caption's score
    col_best = sim.argmax(0)
    masked = torch.zeros_like(sim)
    masked[col_best, torch.arange(4)] = sim[col_best, torch.arange(4)]
    torch.testing.assert_close(dual_softmax(sim, 1e5), masked)
    # video 1 is a hub (scores high for every caption): DSL gives caption 0 back its own video
    hub = torch.tensor([[0.80, 0.85], [0.30, 0.90]])
    assert retrieval_metrics(hub)["t2v"]["R1"] == 50.0
    assert retrieval_metrics(dual_softmax(hub, 100.0, dim=0))["t2v"]["R1"] == 100.0


# --- QB-Norm ------------------------------------------------------------------------------------

def test_qb_norm_hand_example():
    bank = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1]])   # both bank queries retrieve video 0
    test = torch.tensor([[0.7, 0.6, 0.1],                      # top-1 = video 0 (active): normalised
                         [0.2, 0.5, 0.4]])                     # top-1 = video 1: left alone
    out = qb_norm(test, bank, k=1, beta=10.0)
    b, t = bank.double().numpy(), test.double().numpy()
    row0 = np.log(np.exp(10 * t[0]) / np.exp(10 * b).sum(0))   # the inverted softmax, in log space
    np.testing.assert_allclose(out[0].numpy(), row0, rtol=1e-5)
    np.testing.assert_allclose(out[0].numpy(), [-2.31326, 3.68674, -0.31326], atol=1e-4)
    torch.testing.assert_close(out[1], test[1])
    assert out[0].argmax() == 1  # the hub video 0 is demoted for caption 0
    # k=2 activates videos 0 and 1 (bank rows' top-2): both test rows normalised
    out2 = qb_norm(test, bank, k=2, beta=10.0)
    np.testing.assert_allclose(out2[1].numpy(), np.log(np.exp(10 * t[1]) / np.exp(10 * b).sum(0)), rtol=1e-5)


def test_qb_norm_identity_cases():
    gen = torch.Generator().manual_seed(3)
    test = torch.rand(8, 5, generator=gen)
    test[:, 4] = -1.0                         # no test caption ranks video 4 first
    bank = torch.rand(6, 5, generator=gen)
    bank[:, 4] = 2.0                          # ... and the bank only ever activates video 4
    torch.testing.assert_close(qb_norm(test, bank, k=1, beta=20.0), test)
    # a bank in which every video is equally popular (cyclic shifts of one row): every row is
    # normalised by the same constant, so rankings (and metrics) are unchanged
    row = torch.tensor([0.9, 0.5, 0.3, 0.2, 0.1])
    fair = torch.stack([row.roll(i) for i in range(5)])
    sq = torch.rand(5, 5, generator=gen)
    out = qb_norm(sq, fair, k=1, beta=20.0)
    torch.testing.assert_close(out, 20.0 * sq - torch.logsumexp(20.0 * fair, 0)[0], atol=1e-5, rtol=1e-5)
    assert retrieval_metrics(out)["t2v"] == retrieval_metrics(sq)["t2v"]


def test_qb_norm_refuses_test_queries_as_bank():
    sim = torch.rand(4, 4)
    with pytest.raises(ValueError, match="training queries"):
        qb_norm(sim, sim)
    with pytest.raises(ValueError, match="training queries"):
        qb_norm(sim, sim.clone().numpy())
    with pytest.raises(ValueError, match="gallery"):
        qb_norm(sim, torch.rand(3, 5))
    with pytest.raises(ValueError, match="k must"):
        qb_norm(sim, torch.rand(3, 4), k=0)


# --- the tie tolerance -----------------------------------------------------------------------------

def test_rounding_level_differences_are_ties():
    """A video and its time-reversed copy under frame averaging get scores that differ by float
    rounding only (measured on the demo world: 0 to 1.2e-7); whether they come out bit-identical
    depends on thread count and summation order. Either way they are one tie, a coin flip."""
    from vop.engine.metrics import TIE_RTOL, tie_tolerance

    base = torch.tensor([[0.31, 0.31, 0.1], [0.28, 0.28, 0.2], [0.1, 0.2, 0.7]], dtype=torch.float32)
    nudged = base.clone()
    nudged[0, 1] = torch.nextafter(nudged[0, 1], torch.tensor(1.0))  # 1 ulp above the ground truth
    nudged[1, 0] = nudged[1, 0] + 1.2e-7                               # ~4 ulps above
    want = 100 * (0.5 + 0.5 + 1) / 3
    for sim in (base, nudged):
        assert retrieval_metrics(sim)["t2v"]["R1"] == pytest.approx(want)
        assert retrieval_metrics(100 * sim)["t2v"]["R1"] == pytest.approx(want)  # scale-invariant
    # exact equality (tie_rtol=0) flips on rounding: the old, machine-dependent behaviour
    assert retrieval_metrics(nudged, tie_rtol=0)["t2v"]["R1"] == pytest.approx(100 * (0 + 0 + 1) / 3)
    assert tie_tolerance(base) == pytest.approx(TIE_RTOL * 0.7)
    # v2t: video 0's captions are 0 and 1; caption 1's score for video 0 sits a rounding error
    # above caption 0's best -> the two captions of video 0 tie with each other, not a miss
    assert t2v_ranks(nudged, ties=True)[1].tolist() == [1, 1, 0]
    # a real margin is never a tie
    far = base.clone()
    far[0, 1] = 0.3101
    assert t2v_ranks(far, ties=True)[1].tolist()[0] == 0


def test_tolerance_ignores_infinite_scores():
    from vop.engine.metrics import tie_tolerance

    sim = torch.tensor([[0.5, float("-inf")], [0.2, 0.4]])
    assert tie_tolerance(sim) == pytest.approx(1e-6 * 0.5)
    assert retrieval_metrics(sim)["t2v"]["R1"] == 100.0
    with pytest.raises(ValueError, match="tie_rtol"):
        retrieval_metrics(sim, tie_rtol=-1)


@pytest.mark.parametrize("captions_per_video,noise", [(1, 3.0), (1, 4.0), (5, 3.0), (5, 5.0)])
def test_tolerance_changes_nothing_on_real_data_like_matrices(captions_per_video, noise):
    """CLIP-like float32 cosines (512-d unit embeddings, captions = their video + noise, max score
    ~0.4, spread 0.04, R@1 13-55%) at MSR-VTT's test size: the tolerance changes no R@K and no MdR,
    and MnR by far less than the 0.1 anyone reports (a handful of scores closer than 1e-6 x max
    are rounding-level and become coin flips)."""
    gen = torch.Generator().manual_seed(captions_per_video)
    n_video, dim = 1000, 512
    shared = torch.randn(dim, generator=gen)  # a common direction: CLIP scores are not centred at 0
    videos = torch.nn.functional.normalize(torch.randn(n_video, dim, generator=gen) + 2.0 * shared, dim=-1)
    idx = torch.arange(n_video).repeat_interleave(captions_per_video)
    texts = videos[idx] + noise * torch.randn(len(idx), dim, generator=gen) / dim**0.5
    texts = torch.nn.functional.normalize(texts + 0.3 * torch.randn(dim, generator=gen) / dim**0.5, dim=-1)
    sim = texts @ videos.t()
    m_tol = retrieval_metrics(sim, idx)
    m_exact = retrieval_metrics(sim, idx, tie_rtol=0)
    for d in ("t2v", "v2t"):
        assert {k: m_tol[d][k] for k in ("R1", "R5", "R10", "MdR")} == {k: m_exact[d][k] for k in ("R1", "R5", "R10", "MdR")}
        assert m_tol[d]["MnR"] == pytest.approx(m_exact[d]["MnR"], abs=0.005)
    assert 10 < m_tol["t2v"]["R1"] < 70  # a realistic, non-degenerate regime

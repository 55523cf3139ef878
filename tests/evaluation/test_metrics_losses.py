import math

import numpy as np
import torch

from rsitr.evaluation.metrics import chance_metrics, retrieval_metrics, retrieval_metrics_from_embeddings
from rsitr.evaluation.rerank import _queries_above, rerank_matrix, rerank_topk, reranked_metrics
from rsitr.train.losses import csmmc_loss, info_nce, intra_class_loss, mscma_loss, triplet_loss


def _brute_force(sim: np.ndarray, caption_image: np.ndarray) -> dict[str, float]:
    """Per query, count competitors scoring >= the best correct answer (ties count against)."""
    n_img, n_cap = sim.shape
    i2t, t2i = [], []
    for i in range(n_img):
        own = [j for j in range(n_cap) if caption_image[j] == i]
        best = max(sim[i, j] for j in own)
        i2t.append(sum(1 for j in range(n_cap) if j not in own and sim[i, j] >= best))
    for j in range(n_cap):
        target = sim[caption_image[j], j]
        t2i.append(sum(1 for i in range(n_img) if i != caption_image[j] and sim[i, j] >= target))
    out = {}
    for k in (1, 5, 10):
        out[f"i2t_r{k}"] = 100 * np.mean(np.array(i2t) < k)
        out[f"t2i_r{k}"] = 100 * np.mean(np.array(t2i) < k)
    out["mR"] = np.mean(list(out.values()))
    return out


def test_metrics_equal_brute_force_with_ties_and_any_chunk() -> None:
    rng = np.random.default_rng(0)
    for trial in range(5):
        n_img = 23
        caption_image = np.repeat(np.arange(n_img), 5)
        rng.shuffle(caption_image)
        sim = rng.integers(0, 6, size=(n_img, caption_image.size)).astype(np.float32)  # many ties
        expected = _brute_force(sim, caption_image)
        for chunk in (1, 7, 1000):
            got = retrieval_metrics(torch.from_numpy(sim), caption_image, chunk=chunk)
            for key, value in expected.items():
                assert abs(got[key] - value) < 1e-4, (trial, chunk, key)


def test_embeddings_path_matches_matrix_path() -> None:
    gen = torch.Generator().manual_seed(1)
    images = torch.nn.functional.normalize(torch.randn(40, 16, generator=gen), dim=1)
    captions = torch.nn.functional.normalize(torch.randn(200, 16, generator=gen), dim=1)
    caption_image = torch.arange(200) // 5
    assert retrieval_metrics_from_embeddings(images, captions, caption_image, chunk=9) == retrieval_metrics(
        images @ captions.t(), caption_image
    )


def test_perfect_and_constant_scores() -> None:
    caption_image = np.repeat(np.arange(30), 5)
    perfect = (caption_image[None, :] == np.arange(30)[:, None]).astype(np.float32)
    assert retrieval_metrics(perfect, caption_image)["mR"] == 100.0
    assert retrieval_metrics(np.zeros_like(perfect), caption_image)["mR"] == 0.0
    chance = chance_metrics(30, 5)
    assert abs(chance["t2i_r10"] - 100 * 10 / 30) < 1e-9 and 0 < chance["mR"] < 50


def test_triplet_loss_by_hand() -> None:
    sim = torch.tensor([[0.9, 0.5], [0.7, 0.2]])
    # image 0: hardest caption 0.5 → relu(0.5+0.5-0.9)=0.1; image 1: relu(0.5+0.7-0.2)=1.0
    # caption 0: hardest image 0.7 → relu(0.5+0.7-0.9)=0.3; caption 1: relu(0.5+0.5-0.2)=0.8
    assert torch.isclose(triplet_loss(sim, 0.5), torch.tensor(0.1 + 1.0 + 0.3 + 0.8))


def test_info_nce_by_hand() -> None:
    sim = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = -torch.log(torch.exp(torch.tensor(10.0)) / (torch.exp(torch.tensor(10.0)) + 1))
    assert torch.isclose(info_nce(sim, 0.1), expected)


def test_mscma_by_hand() -> None:
    m = torch.tensor([[0.9, 0.2], [0.4, 0.6]])
    row0 = -math.log(math.exp(0.9) / (math.exp(0.9) + math.exp(0.2)))
    row1 = -math.log(math.exp(0.6) / (math.exp(0.4) + math.exp(0.6)))
    col0 = -math.log(math.exp(0.9) / (math.exp(0.9) + math.exp(0.4)))
    col1 = -math.log(math.exp(0.6) / (math.exp(0.2) + math.exp(0.6)))
    # two scales: rows averaged over the batch, summed over the scales
    assert math.isclose(float(mscma_loss([m, m])), row0 + row1, rel_tol=1e-6)
    assert math.isclose(float(mscma_loss([m], both_directions=True)), (row0 + row1 + col0 + col1) / 2, rel_tol=1e-6)


def test_csmmc_by_hand_and_teacher_gets_no_gradient() -> None:
    student = torch.tensor([[0.9, 0.2], [0.4, 0.6]], requires_grad=True)
    teacher = torch.tensor([[0.7, 0.5], [0.1, 0.3]], requires_grad=True)
    t = 2.0

    def column_softmax(m: list[list[float]]) -> list[list[float]]:
        out = [[0.0, 0.0], [0.0, 0.0]]
        for j in range(2):
            z = sum(math.exp(m[i][j] / t) for i in range(2))
            for i in range(2):
                out[i][j] = math.exp(m[i][j] / t) / z
        return out

    p = column_softmax(student.tolist())
    q = column_softmax(teacher.tolist())
    expected = sum(p[i][j] * math.log(p[i][j] / q[i][j]) for i in range(2) for j in range(2)) / 4
    loss = csmmc_loss([student, teacher], temperature=t)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    loss.backward()
    assert teacher.grad is None and student.grad is not None and student.grad.any()


def test_intra_class_term_by_hand() -> None:
    sim = torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.8, 0.2], [0.0, 0.4, 0.7]])
    labels = torch.tensor([1, 1, -1])
    # same class, off the diagonal: (0,1) and (1,0); the unlabelled third item is never paired
    assert math.isclose(float(intra_class_loss(sim, labels)), ((1 - 0.5) + (1 - 0.3)) / 2, rel_tol=1e-6)
    assert float(intra_class_loss(sim, torch.tensor([1, 2, -1]))) == 0.0


def _rerank_by_hand(sim: torch.Tensor, query: int, k: int, weight: float = 0.7) -> tuple[list[int], list[float]]:
    top = sim[query].topk(k).indices.tolist()
    reverse = [int((sim[:, j] > sim[query, j]).sum()) for j in top]
    by_reverse = sorted(range(k), key=lambda r: (reverse[r], r))
    reverse_position = {top[r]: position for position, r in enumerate(by_reverse)}
    scores = {
        j: float(sim[query, j] / sim[:, j].sum())
        + math.exp(-0.05 * (r + 1))
        + weight * math.exp(-0.05 * (reverse_position[j] + 1))
        for r, j in enumerate(top)
    }
    order = sorted(scores, key=lambda j: -scores[j])
    return order, [scores[j] for j in order]


def test_rerank_equals_the_formula_by_hand_in_both_directions() -> None:
    gen = torch.Generator().manual_seed(3)
    sim = torch.rand(9, 30, generator=gen) + 0.1  # cosine-like, positive column sums
    for matrix in (sim, sim.t()):
        order, scores = rerank_topk(matrix, k=6, chunk=4)
        for query in range(matrix.shape[0]):
            expected_order, expected_scores = _rerank_by_hand(matrix, query, 6)
            assert order[query].tolist() == expected_order
            assert torch.allclose(scores[query], torch.tensor(expected_scores), atol=1e-5)
        lifted = rerank_matrix(matrix, k=6)
        assert torch.equal(lifted.argsort(dim=1, descending=True)[:, :6], order)
        rest = matrix.argsort(dim=1, descending=True)[:, 6:]
        assert torch.equal(lifted.gather(1, rest), matrix.gather(1, rest))
    candidates = sim.topk(6, dim=1).indices.flip(1)  # the same candidates in another order give the same re-rank
    assert torch.equal(rerank_topk(sim, k=6, candidates=candidates)[0], rerank_topk(sim, k=6)[0])
    heavier_order, heavier_scores = rerank_topk(sim, k=6, reverse_weight=1.5)
    for query in range(sim.shape[0]):
        expected_order, expected_scores = _rerank_by_hand(sim, query, 6, weight=1.5)
        assert heavier_order[query].tolist() == expected_order
        assert torch.allclose(heavier_scores[query], torch.tensor(expected_scores), atol=1e-5)
    assert not torch.equal(heavier_order, rerank_topk(sim, k=6)[0])  # the weight changes some order


def test_reverse_ranks_count_only_strictly_higher_queries_when_scores_tie() -> None:
    # RSICD's duplicate captions tie exactly; a tie must not push a query down its candidate's column
    gen = torch.Generator().manual_seed(4)
    sim = (torch.rand(12, 40, generator=gen) * 6).round() / 6 + 0.1
    for matrix in (sim, sim.t()):
        order, scores = rerank_topk(matrix, k=8, chunk=5, reverse_weight=2.0)
        for query in range(matrix.shape[0]):
            expected_order, expected_scores = _rerank_by_hand(matrix, query, 8, weight=2.0)
            assert order[query].tolist() == expected_order
            assert torch.allclose(scores[query], torch.tensor(expected_scores), atol=1e-5)
        # counted a few columns at a time (as a large split is), the ranks are the same
        top = matrix.topk(8, dim=1).indices
        by_definition = torch.tensor(
            [[int((matrix[:, c] > matrix[q, c]).sum()) for c in top[q]] for q in range(matrix.shape[0])]
        )
        for cells in (1, 2 * matrix.shape[0] + 1, 10**6):
            assert torch.equal(_queries_above(matrix, top, cells=cells), by_definition)


def test_reranked_metrics_keep_order_at_k1_and_differ_at_k10() -> None:
    gen = torch.Generator().manual_seed(5)
    caption_image = torch.arange(100) // 5
    images = torch.nn.functional.normalize(torch.randn(20, 8, generator=gen), dim=1)
    captions = torch.nn.functional.normalize(images[caption_image] + 0.9 * torch.randn(100, 8, generator=gen), dim=1)
    sim = images @ captions.t() + 1.0  # keep column sums positive, as trained cosine scores are
    assert reranked_metrics(sim, caption_image, k=1) == retrieval_metrics(sim, caption_image)
    assert reranked_metrics(sim, caption_image, k=10) != retrieval_metrics(sim, caption_image)


def test_early_stopping_waits_patience_epochs_without_a_val_gain() -> None:
    from rsitr.train.loop import stale_for

    def history(*values: float) -> list[dict[str, float]]:
        return [{"epoch": i, "val_mR": v} for i, v in enumerate(values)]

    assert not stale_for(history(10, 9, 8), patience=0)  # off
    assert not stale_for(history(10, 9), patience=2)  # too early to tell
    assert stale_for(history(10, 9, 10), patience=2)  # a tie is no gain
    assert not stale_for(history(10, 9, 11), patience=2)
    assert not stale_for(history(5, 10, 9), patience=2)  # the best is one epoch old
    assert stale_for(history(5, 10, 9, 8), patience=2)


def test_random_tie_order_gives_the_expected_recall_of_shuffled_sorts() -> None:
    # image 0's best caption ties exactly with 3 captions of other images (a caption string they share)
    caption_image = np.repeat(np.arange(4), 2)
    sim = np.full((4, 8), 0.1, np.float32)
    sim[0, [0, 2, 4, 6]] = 0.9  # own caption 0 and one caption of each other image, all equal
    for i in range(1, 4):
        sim[i, 2 * i] = 1.0
    against = retrieval_metrics(sim, caption_image, ties="against")
    random_order = retrieval_metrics(sim, caption_image, ties="random")
    assert against["i2t_r1"] == 75.0  # image 0 misses: its 3 ties rank ahead
    assert random_order["i2t_r1"] == 100 * (3 + 1 / 4) / 4  # image 0 hits with probability 1/4
    assert random_order["i2t_r5"] == against["i2t_r5"] == 100.0
    # the expectation matches what sorting under many random tie orders gives
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(4000):
        order = rng.permutation(8)
        ranked = order[np.argsort(-sim[0, order], kind="stable")]
        hits += caption_image[ranked[0]] == 0
    assert abs(100 * hits / 4000 - 25.0) < 2.5
    flat = retrieval_metrics(np.zeros_like(sim), caption_image, ties="random")
    assert abs(flat["i2t_r1"] - 100 * 2 / 8) < 1e-9 and abs(flat["t2i_r1"] - 100 / 4) < 1e-9  # chance

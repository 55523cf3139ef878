import numpy as np
import torch

from rsitr.losses import info_nce, triplet_loss
from rsitr.metrics import chance_metrics, retrieval_metrics, retrieval_metrics_from_embeddings


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

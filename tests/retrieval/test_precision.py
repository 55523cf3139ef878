"""Inference precision: bf16 autocast where asked (or where the CPU has bf16 hardware), float32 otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rsitr.retrieval.embedders import ImageEmbedder
from rsitr.runtime.precision import inference, use_bf16, with_text_weights_in_bf16


def test_bf16_only_on_cpu_and_only_when_asked_or_auto() -> None:
    cpu = torch.device("cpu")
    assert use_bf16("bfloat16", cpu) and not use_bf16("float32", cpu)
    assert not use_bf16("bfloat16", torch.device("cuda"))  # GPUs keep float32 here
    with pytest.raises(ValueError, match="precision 'half' is not one of auto, float32, bfloat16"):
        use_bf16("half", cpu)


def test_text_weights_stored_in_bf16_give_the_same_bits_as_autocast_casting_them_per_pass() -> None:
    from rsitr.config import load_config
    from rsitr.models.msa import build_model

    torch.manual_seed(0)
    model = build_model(load_config("demo").model).eval()
    queries = with_text_weights_in_bf16(model)
    linear = [m for m in queries.text.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)
    ids = torch.randint(1, 500, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with inference(True):
        assert torch.equal(queries.encode_text(ids, mask), model.encode_text(ids, mask))
    # the model it was copied from keeps float32 weights (float32 callers still work); the rest is shared
    assert all(p.dtype == torch.float32 for p in model.text.parameters())
    assert queries.backbone is model.backbone
    with torch.no_grad():
        assert model.encode_text(ids, mask).dtype == torch.float32


def test_tiles_embedded_in_bf16_point_where_float32_ones_do(untrained_checkpoint: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (6, 128, 128, 3), dtype=np.uint8)
    batch = {"image": pixels, "image_id": np.arange(6), "path": np.zeros(6)}
    exact = ImageEmbedder(str(untrained_checkpoint), "float32")(batch)["embedding"]
    fast_embedder = ImageEmbedder(str(untrained_checkpoint), "bfloat16")
    assert fast_embedder.bf16 and exact.dtype == np.float32
    fast = fast_embedder(batch)["embedding"]
    assert fast.dtype == np.float32 and np.allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-5)
    assert float((exact * fast).sum(axis=1).min()) > 0.995


def test_a_bad_view_count_is_refused_by_name_before_anything_is_read(tmp_path: Path) -> None:
    from rsitr.config import ConfigError
    from rsitr.models.checkpoint import load_checkpoint
    from rsitr.retrieval.embed import embed_archive

    with pytest.raises(ConfigError, match=r"test views 3: expected one of \(1, 4, 8\)"):
        embed_archive(str(tmp_path / "no-checkpoint"), str(tmp_path / "no-data"), str(tmp_path / "out"), test_views=3)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="test views 2"):
        load_checkpoint(str(tmp_path / "no-checkpoint"), test_views=2)

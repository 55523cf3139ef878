import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rsitr.config import load_config
from rsitr.errors import CheckpointError, UnsafeFileError
from rsitr.models.backbone import IMAGENET_MEAN, IMAGENET_STD, MultiScaleBackbone, create_classifier
from rsitr.models.checkpoint import OPTIMIZER, WEIGHTS, load_checkpoint, load_training_state, read_meta, save_checkpoint
from rsitr.models.gswin import GswinBlock
from rsitr.models.msa import build_model
from rsitr.models.mscmat import MSCMAT
from rsitr.models.tokenizers import load_tokenizer
from rsitr.train.losses import total_loss
from rsitr.train.optim import make_optimizer


def _batch(n: int = 4, size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen)
    ids = torch.randint(1000, 2000, (n, 12), generator=gen)
    mask = torch.ones(n, 12, dtype=torch.long)
    mask[0, 6:] = 0
    return images, ids, mask


def test_gradients_reach_every_trainable_parameter_and_frozen_stay_frozen() -> None:
    config = load_config("msa-lite0-minilm-mscmat", ["model.gswin_stages=4", "loss.intra_class_weight=1"])
    model = build_model(config.model)
    model.train()
    for name, parameter in model.named_parameters():  # Gswin's residual outputs start at zero; move them off it
        if name.startswith("backbone.gswin") and ("out_proj" in name or "mlp.2" in name):
            torch.nn.init.normal_(parameter, std=0.02)
    out = model(*_batch())
    labels = torch.tensor([3, 3, -1, 5])
    terms = total_loss(out.image @ out.text.t(), config.loss, out.mscmat, labels)
    assert set(terms) == {"triplet", "infonce", "mscma", "csmmc", "intra", "loss"}
    terms["loss"].backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    without_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not without_grad
    assert any(n.startswith("mscmat.scales.3") for n in trainable) and "backbone.gswin.4.mlp.0.weight" in trainable
    assert any(n.startswith("backbone.body.blocks.6") for n in trainable)
    assert not any(n.startswith("backbone.body.conv_stem") for n in trainable)
    assert "text.encoder.encoder.layer.5.attention.self.query.weight" in trainable
    assert "text.encoder.encoder.layer.0.attention.self.query.weight" not in trainable
    # Frozen BatchNorm layers stay in eval mode while training.
    assert not model.backbone.body.bn1.training


def test_paper_preset_builds_offline_and_trains_a_step() -> None:
    config = load_config("msa-resnet50-bert", ["model.image_pretrained=false", "model.text_pretrained=false"])
    model = build_model(config.model)
    assert model.backbone.channels == [256, 512, 1024, 2048] and model.text.width == 768
    assert model.mscmat is not None and len(model.mscmat.scales) == 4
    optimizer = make_optimizer(model, config.train)
    out = model(*_batch(n=3))
    terms = total_loss(out.image @ out.text.t(), config.loss, out.mscmat)
    assert set(terms) == {"triplet", "mscma", "csmmc", "loss"}
    before = model.mscmat.scales[0].k.weight.detach().clone()
    terms["loss"].backward()
    optimizer.step()
    assert not torch.equal(before, model.mscmat.scales[0].k.weight)
    # timm zero-initialises each ResNet block's last BatchNorm, so at step 0 only some of the branch gets gradients;
    # every trainable parameter must still be reached by autograd
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    tokens = load_tokenizer("bert-base-uncased")("a playground near trees")["input_ids"]
    assert tokens == [101, 1037, 14705, 2379, 3628, 102]  # bert-base-uncased's WordPiece ids


def test_vectorised_mscmat_equals_the_pair_loop_with_padding() -> None:
    torch.manual_seed(0)
    channels = [24, 40, 112, 320]
    scales = [torch.randn(5, c) for c in channels]
    tokens = torch.randn(6, 9, 48)
    mask = torch.ones(6, 9, dtype=torch.long)
    for j in range(6):
        mask[j, 2 + j :] = 0
    text_global = torch.randn(6, 48)
    for dim, mask_padding in ((48, True), (64, True), (48, False)):
        mscmat = MSCMAT(channels, 48, dim, heads=4, mask_padding=mask_padding)
        fast = mscmat(scales, tokens, mask, text_global)
        slow = mscmat.pairwise_reference(scales, tokens, mask, text_global)
        assert [m.shape for m in fast] == [(5, 6)] * 4
        for a, b in zip(fast, slow, strict=True):
            assert (a - b).abs().max() <= 1e-5
    # the padding mask matters: the same inputs without it score differently
    unmasked = MSCMAT(channels, 48, 48, heads=4, mask_padding=False)
    unmasked.load_state_dict(mscmat.state_dict())
    masked = MSCMAT(channels, 48, 48, heads=4, mask_padding=True)
    masked.load_state_dict(mscmat.state_dict())
    assert (
        masked(scales, tokens, mask, text_global)[0] - unmasked(scales, tokens, mask, text_global)[0]
    ).abs().max() > 1e-4


def test_the_whole_model_scores_alike_with_either_mscmat() -> None:
    config = load_config("msa-lite0-minilm-mscmat")
    model = build_model(config.model).eval()
    with torch.no_grad():
        fast = model(*_batch(n=3)).mscmat
        model.use_pairwise_reference = True
        slow = model(*_batch(n=3)).mscmat
    assert max(float((a - b).abs().max()) for a, b in zip(fast, slow, strict=True)) <= 1e-5


def test_gswin_starts_as_identity_and_keeps_the_map_shape() -> None:
    torch.manual_seed(0)
    block = GswinBlock(64, window=4)
    x = torch.randn(2, 64, 10, 9)
    assert torch.equal(block(x), x)
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    y = block(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
    shifted = x.clone()
    shifted[1] += 1.0
    assert torch.equal(block(shifted)[0], y[0])  # images of a batch never mix


def test_embeddings_are_unit_norm_and_image_size_free() -> None:
    model = build_model(load_config("demo").model).eval()
    for size in (64, 96):
        images, ids, mask = _batch(size=size)
        with torch.no_grad():
            out = model(images, ids, mask)
        image_emb, text_emb = out.image, out.text
        assert image_emb.shape == text_emb.shape == (4, 256)
        assert torch.allclose(image_emb.norm(dim=1), torch.ones(4), atol=1e-5)


def test_test_views_make_an_image_embedding_the_same_for_every_flip_and_turn_of_the_tile() -> None:
    images, _, _ = _batch(n=2)
    turned, flipped = images.rot90(1, (1, 2)), images.flip(2)
    single = build_model(load_config("demo").model).eval()
    eight = build_model(load_config("demo", ["model.test_views=8"]).model).eval()
    four = build_model(load_config("demo", ["model.test_views=4"]).model).eval()
    eight.load_state_dict(single.state_dict())
    four.load_state_dict(single.state_dict())
    with torch.no_grad():
        assert not torch.allclose(single.encode_image(images), single.encode_image(turned), atol=1e-3)
        assert torch.allclose(eight.encode_image(images), eight.encode_image(turned), atol=1e-5)
        assert torch.allclose(eight.encode_image(images), eight.encode_image(flipped.transpose(1, 2)), atol=1e-5)
        assert torch.allclose(four.encode_image(images), four.encode_image(flipped), atol=1e-5)
        assert not torch.allclose(four.encode_image(images), four.encode_image(turned), atol=1e-3)
        views = [images, images.flip(2), images.flip(1), images.flip(1).flip(2)]
        per_view = [single.backbone(view) for view in views]
        by_hand = single._fuse([torch.stack(scale).mean(0) for scale in zip(*per_view, strict=True)])
        assert torch.allclose(four.encode_image(images), by_hand, atol=1e-6)
    eight.train()  # training sees one view: augmentation, not averaging, is what a training step wants
    torch.manual_seed(0)
    trained_once = eight.encode_image(images)
    single.train()
    torch.manual_seed(0)
    assert torch.allclose(trained_once, single.encode_image(images))
    with pytest.raises(ValueError, match="test_views 3"):
        build_model(load_config("demo", ["model.test_views=3"]).model)


@pytest.mark.parametrize(("backbone", "size"), [("efficientnet_lite0", 224), ("efficientnet_lite2", 260)])
def test_packaged_lite_weights_classify_a_known_photo(backbone: str, size: int) -> None:
    import matplotlib
    import numpy as np
    from PIL import Image

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    pixels = np.asarray(Image.open(photo).convert("RGB").resize((size, size)), dtype=np.float32) / 255
    x = (torch.from_numpy(pixels).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(
        IMAGENET_STD
    )[:, None, None]
    model = create_classifier(backbone, pretrained=True).eval()  # strict load: every tensor mapped
    with torch.no_grad():
        top = model(x[None]).softmax(-1)[0].topk(3).indices.tolist()
    assert top[0] == 652  # ImageNet "military uniform": Grace Hopper in her US Navy uniform
    assert {834, 457} & set(top)  # "suit", "bow tie"


def test_backbone_normalisation_uses_the_statistics_its_weights_were_trained_with() -> None:
    lite = MultiScaleBackbone("efficientnet_lite2", pretrained=False, normalization="backbone")
    assert torch.allclose(lite.mean.flatten(), torch.full((3,), 127.5))
    assert torch.allclose(lite.std.flatten(), torch.full((3,), 127.5))
    default = MultiScaleBackbone("efficientnet_lite2", pretrained=False)
    assert torch.allclose(default.mean.flatten(), torch.tensor(IMAGENET_MEAN) * 255)
    with pytest.raises(ValueError, match="image_normalization"):
        MultiScaleBackbone("efficientnet_lite2", pretrained=False, normalization="none")


def test_packaged_mpnet_unpacks_once_and_ranks_a_paraphrase_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rsitr.models.naming import resolve_text_model
    from rsitr.models.packaged_text import MPNET_SHA256
    from rsitr.models.text import TextEncoder
    from rsitr.models.tokenizers import load_tokenizer

    monkeypatch.setenv("RSITR_CACHE", str(tmp_path))
    folder = Path(resolve_text_model("all-mpnet-base-v2"))
    assert folder.parent == tmp_path / "models" and MPNET_SHA256[:12] in folder.name
    assert sorted(p.name for p in tmp_path.joinpath("models").iterdir()) == [folder.name]  # no scratch left over
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_text_model("all-mpnet-base-v2") == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # unpacked once
    encoder = TextEncoder("all-mpnet-base-v2").eval()
    assert type(encoder.encoder).__name__ == "MPNetModel" and encoder.width == 768
    texts = ["many planes are parked at the airport", "a dense forest of green trees",
             "several airplanes stand beside the terminal"]  # fmt: skip
    tokens = load_tokenizer("all-mpnet-base-v2")(texts, padding=True, return_tensors="pt")
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    halves = TextEncoder("all-mpnet-base-v2", frozen_layers=7).eval()
    with torch.no_grad():
        pooled, _ = encoder(ids, mask)
        split, _ = halves.from_prefix(halves.frozen_prefix(ids, mask), mask)
    vectors = torch.nn.functional.normalize(pooled, dim=-1)
    similarity = vectors @ vectors.t()
    assert similarity[0, 2] > similarity[0, 1] + 0.2  # the paraphrase, not the forest
    torch.testing.assert_close(split, pooled, atol=1e-5, rtol=1e-5)  # relative position bias survives the split


def test_optimizer_covers_exactly_the_trainable_parameters() -> None:
    config = load_config("msa-lite0-minilm")
    model = build_model(config.model)
    optimizer = make_optimizer(model, config.train)
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}


def test_checkpoint_round_trip_is_bit_exact(tmp_path: Path) -> None:
    config = load_config("demo", ["model.mscmat=true", "model.gswin_stages=3,4"])
    model = build_model(config.model)
    version = save_checkpoint(tmp_path, model, None, config, epoch=3, metrics={"val_mR": 1.0})
    loaded, loaded_config, state = load_checkpoint(str(tmp_path))
    assert loaded_config == config and state["epoch"] == 3 and state["model_version"] == version
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert set(load_file(str(tmp_path / WEIGHTS))) == set(original)


def test_the_image_side_loads_alone_embeds_the_same_and_refuses_captions(tmp_path: Path) -> None:
    config = load_config("demo", ["model.head_ensemble=2", "model.fusion=mlp"])
    torch.manual_seed(0)
    save_checkpoint(tmp_path, build_model(config.model), None, config, epoch=0, metrics={})
    whole, _, _ = load_checkpoint(str(tmp_path))
    image_side, _, _ = load_checkpoint(str(tmp_path), text=False)
    assert image_side.text is None
    assert set(image_side.state_dict()) < set(whole.state_dict())
    assert not any(name.startswith(("text.", "text_proj.")) for name in image_side.state_dict())
    images, ids, mask = _batch()
    with torch.no_grad():
        assert torch.equal(image_side.encode_image(images), whole.encode_image(images))
        with pytest.raises(RuntimeError, match="built without its text side"):
            image_side.encode_text(ids, mask)
    # MSCMAT (a head ensemble has none) reads captions: the image side leaves it out too
    with_mscmat = load_config("demo", ["model.mscmat=true", "model.fusion=mlp"])
    save_checkpoint(tmp_path / "mscmat", build_model(with_mscmat.model), None, with_mscmat, epoch=0, metrics={})
    assert load_checkpoint(str(tmp_path / "mscmat"))[0].mscmat is not None
    image_side_of_mscmat, _, _ = load_checkpoint(str(tmp_path / "mscmat"), text=False)
    assert image_side_of_mscmat.mscmat is None
    assert not any(name.startswith("mscmat.") for name in image_side_of_mscmat.state_dict())
    # the embedding actors' imports: the image side of a checkpoint never loads transformers
    probe = (
        "import sys; from rsitr.retrieval.embedders import ImageEmbedder; "
        f"ImageEmbedder({str(tmp_path)!r}, 'float32'); print('transformers' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "False\n"


def test_cpu_default_fuses_every_lite0_block_and_the_head_with_the_image_tower_frozen() -> None:
    config = load_config("msa-lite0-minilm", ["model.image_pretrained=false"])
    model = build_model(config.model)
    assert model.backbone.channels == [40, 80, 112, 192, 320, 1280]
    assert not any(p.requires_grad for p in model.backbone.parameters())
    images, ids, mask = _batch(n=3)
    scales, feature_map = model.backbone.frozen_prefix(images)
    assert scales.shape == (3, 2024) and feature_map.numel() == 0
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"scale_proj", "fusion", "text", "text_proj", "log_temperature"}


def test_joined_towers_stay_frozen_and_a_single_head_keeps_its_checkpoint_names() -> None:
    joined_image = ["model.image_backbone=efficientnet_lite0+efficientnet_lite0", "model.image_pretrained=false"]
    with pytest.raises(ValueError, match="freeze_image_stages to at least 4"):
        build_model(load_config("demo", [*joined_image, "model.freeze_image_stages=3"]).model)
    with pytest.raises(ValueError, match="freeze_text_layers to at least 6"):
        build_model(load_config("demo", ["model.text_model=all-MiniLM-L6-v2+all-MiniLM-L6-v2"]).model)
    for lopsided in (
        ["model.image_backbone=efficientnet_lite0+", *joined_image[1:]],
        ["model.text_model=+all-MiniLM-L6-v2"],
    ):
        with pytest.raises(ValueError, match="a model name is missing"):
            build_model(load_config("demo", lopsided).model)
    with pytest.raises(ValueError, match="head_ensemble"):
        build_model(
            load_config("msa-lite0-minilm-mscmat", ["model.head_ensemble=2", "model.image_pretrained=false"]).model
        )
    names = set(build_model(load_config("demo", ["model.image_pretrained=false"]).model).state_dict())
    assert {"scale_proj.0.weight", "fusion.w1.weight", "text_proj.weight"} <= names
    assert not any(n.startswith("extra_heads") for n in names)
    ensemble = build_model(load_config("demo", ["model.image_pretrained=false", "model.head_ensemble=2"]).model)
    assert {"scale_proj.0.weight", "extra_heads.0.scale_proj.0.weight"} <= set(ensemble.state_dict())


class _RunsCode:
    """What a crafted optimizer.pt carries: unpickling it would call ``Path.touch`` on the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


def test_a_checkpoint_whose_optimizer_file_carries_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    config = load_config("demo")
    model = build_model(config.model)
    optimizer = make_optimizer(model, config.train)
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, model, optimizer, config, epoch=0, metrics={})
    assert load_training_state(folder, model, optimizer)["epoch"] == 0  # the genuine file loads
    marker = tmp_path / "executed"
    torch.save({"optimizer": _RunsCode(marker)}, folder / OPTIMIZER)
    with pytest.raises(UnsafeFileError, match="optimizer.pt: refused, it holds objects other than tensors"):
        load_training_state(folder, model, optimizer)
    assert not marker.exists()
    # the file would have run the code had it been loaded the unsafe way: the drill is real
    torch.load(folder / OPTIMIZER, weights_only=False)
    assert marker.exists()


def test_read_meta_gives_config_and_version_without_the_weights(tmp_path: Path) -> None:
    config = load_config("demo")
    version = save_checkpoint(tmp_path / "ckpt", build_model(config.model), None, config, 2, {"val_mR": 3.5})
    (tmp_path / "ckpt" / WEIGHTS).unlink()  # read_meta must not need them; resolving needs a checkpoint, so a run
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text(json.dumps({"best_checkpoint": str(tmp_path / "ckpt")}))
    meta = read_meta(str(tmp_path / "run"))
    assert (meta.uri, meta.config, meta.epoch, meta.model_version) == (str(tmp_path / "ckpt"), config, 2, version)
    assert meta.metrics == {"val_mR": 3.5}
    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        read_meta(str(tmp_path / "run"))

from pathlib import Path

import torch
from safetensors.torch import load_file

from rsitr.checkpoint import WEIGHTS, load_checkpoint, save_checkpoint
from rsitr.config import load_config
from rsitr.losses import total_loss
from rsitr.models.backbone import IMAGENET_MEAN, IMAGENET_STD, create_classifier
from rsitr.models.msa import build_model
from rsitr.train import make_optimizer


def _batch(n: int = 4, size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen)
    ids = torch.randint(1000, 2000, (n, 12), generator=gen)
    mask = torch.ones(n, 12, dtype=torch.long)
    mask[0, 6:] = 0
    return images, ids, mask


def test_gradients_reach_every_trainable_parameter_and_frozen_stay_frozen() -> None:
    config = load_config("msa-lite0-minilm")
    model = build_model(config.model)
    model.train()
    image_emb, text_emb = model(*_batch())
    total_loss(image_emb @ text_emb.t(), config.loss)["loss"].backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    without_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not without_grad
    assert any(n.startswith("backbone.body.blocks.6") for n in trainable)
    assert not any(n.startswith("backbone.body.conv_stem") for n in trainable)
    assert "text.encoder.encoder.layer.5.attention.self.query.weight" in trainable
    assert "text.encoder.encoder.layer.0.attention.self.query.weight" not in trainable
    # Frozen BatchNorm layers stay in eval mode while training.
    assert not model.backbone.body.bn1.training


def test_embeddings_are_unit_norm_and_image_size_free() -> None:
    model = build_model(load_config("demo").model).eval()
    for size in (64, 96):
        images, ids, mask = _batch(size=size)
        with torch.no_grad():
            image_emb, text_emb = model(images, ids, mask)
        assert image_emb.shape == text_emb.shape == (4, 256)
        assert torch.allclose(image_emb.norm(dim=1), torch.ones(4), atol=1e-5)


def test_packaged_lite0_weights_classify_a_known_photo() -> None:
    import matplotlib
    import numpy as np
    from PIL import Image

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    pixels = np.asarray(Image.open(photo).convert("RGB").resize((224, 224)), dtype=np.float32) / 255
    x = (torch.from_numpy(pixels).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(
        IMAGENET_STD
    )[:, None, None]
    model = create_classifier("efficientnet_lite0", pretrained=True).eval()
    with torch.no_grad():
        top = model(x[None]).softmax(-1)[0].topk(3).indices.tolist()
    assert top[0] == 652  # ImageNet "military uniform": Grace Hopper in her US Navy uniform
    assert {834, 457} & set(top)  # "suit", "bow tie"


def test_optimizer_covers_exactly_the_trainable_parameters() -> None:
    config = load_config("msa-lite0-minilm")
    model = build_model(config.model)
    optimizer = make_optimizer(model, config.train)
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}


def test_checkpoint_round_trip_is_bit_exact(tmp_path: Path) -> None:
    config = load_config("demo")
    model = build_model(config.model)
    version = save_checkpoint(tmp_path, model, None, config, epoch=3, metrics={"val_mR": 1.0})
    loaded, loaded_config, state = load_checkpoint(str(tmp_path))
    assert loaded_config == config and state["epoch"] == 3 and state["model_version"] == version
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert set(load_file(str(tmp_path / WEIGHTS))) == set(original)

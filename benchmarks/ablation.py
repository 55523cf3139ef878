"""What each part of the recipe is worth on RSICD: rows trained and measured one by one, each saved as it finishes.

Two kinds of rows:
- **heads** rows train only heads over frozen towers, from features ``tower_features.py`` computed once
  (:mod:`heads`; seconds per epoch, so they get 3 seeds);
- **pipeline** rows run the product end to end through Ray Train (``rsitr.train.fit``: frozen-prefix cache,
  DDP workers, best epoch on val, test once) for what heads alone cannot show: MSA's MSCMAT terms, fine-tuning.

Every row reports test R@K and mR at the epoch chosen on val (test read once per finished run), val mR, and its
wall-clock on this machine including the features it needed. Results go to ``ablation.json`` after every
(row, seed), so a stopped run resumes where it stopped; ``ablation.md`` and ``ablation.png`` are written from it.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from heads import Corpus, HeadsRecipe, train_heads, with_changes

from rsitr.evaluation.metrics import METRIC_KEYS

# DESIGN.md's floor: frozen Lite0 (ImageNet statistics) + MiniLM, two-layer MLP heads; 20 epochs (val peaked
# at epochs 9–21 of 30 in trial runs)
FLOOR = HeadsRecipe(epochs=20)
LITE2_MPNET = with_changes(FLOOR, image="img-efficientnet_lite2-260-backbone", text="txt-all-mpnet-base-v2-32")


@dataclass(frozen=True)
class Row:
    """One line of the ablation table."""

    name: str
    what: str
    heads: HeadsRecipe | None = None
    preset: str = ""
    overrides: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    rerank_k: int = 0  # also report the SMR re-rank of the chosen epoch's matrices
    decides_default: bool = False


SEEDS3 = (0, 1, 2)
JOINED = with_changes(
    LITE2_MPNET,
    image=f"{LITE2_MPNET.image}+{FLOOR.image}",
    text=f"{LITE2_MPNET.text}+{FLOOR.text}",
    ensemble=3,
)
# msa-four-towers' image features: Lite2 and Lite0 at 260 px, each at its own pixel statistics (tower_features.py)
FOUR_TOWERS_260 = "img-efficientnet_lite2-efficientnet_lite0-260-backbone-bf16"
ROWS: list[Row] = [
    Row("floor", "frozen Lite0 + MiniLM, MLP heads (DESIGN.md's recipe)", FLOOR, seeds=SEEDS3, decides_default=True),
    Row("Lite2 + mpnet", "both stronger towers, frozen", LITE2_MPNET, seeds=SEEDS3, decides_default=True),
    Row(
        "all four towers, ensemble of 3",
        "Lite2 ⊕ Lite0 image features, mpnet ⊕ MiniLM caption features, 3 heads averaged",
        JOINED,
        seeds=SEEDS3,
        decides_default=True,
    ),
    Row(
        "all four towers, Lite statistics, ensemble of 3",
        "as above with Lite0 fed the pixel statistics it was trained with (what msa-four-towers does)",
        with_changes(JOINED, image=f"{LITE2_MPNET.image}+img-efficientnet_lite0-224-backbone"),
        seeds=SEEDS3,
        decides_default=True,
    ),
    Row(
        "msa-four-towers",
        "the CPU default through the product: Ray Train from the frozen-prefix cache, Lite0 at 260 px, val on 1 view "
        "and test on 8, both SMR re-ranked (top 50, reverse weight 2.0)",
        preset="msa-four-towers",
        seeds=SEEDS3,
        decides_default=True,
    ),
    *(
        Row(
            f"four towers at 260 px, {name}",
            f"the heads-only analogue of msa-four-towers (bf16 towers as rsitr embed runs them): {what}",
            with_changes(JOINED, image=FOUR_TOWERS_260 + train, test_image=FOUR_TOWERS_260 + test),
            seeds=SEEDS3,
            rerank_k=10,
            decides_default=True,
        )
        for name, what, train, test in (
            ("8 test views", "trained on each tile as it is, tested on 8-view means (model.test_views=8)", "", "-d8"),
            ("8 views", "trained and tested on each tile's pooled scales averaged over its 8 views", "-d8", "-d8"),
            ("1 view", "each tile as it is, in training and test", "", ""),
        )
    ),
    Row(
        "floor, Lite statistics",
        "floor with the pixel statistics Lite0 was trained with (0.5/0.5)",
        with_changes(FLOOR, image="img-efficientnet_lite0-224-backbone"),
    ),
    Row("Lite2", "floor with EfficientNet-Lite2 at its 260 px", with_changes(FLOOR, image=LITE2_MPNET.image)),
    Row("mpnet", "floor with all-mpnet-base-v2 captions", with_changes(FLOOR, text=LITE2_MPNET.text)),
    Row("Lite2 + mpnet, ensemble of 3", "3 heads averaged", with_changes(LITE2_MPNET, ensemble=3)),
    Row(
        "Lite2 + mpnet, duplicate-aware",
        "a caption string shared by images counts as a positive for each",
        with_changes(LITE2_MPNET, duplicate_aware=True),
    ),
    Row(
        "Lite2 + mpnet, intra-class",
        "CMPAGL's intra-class term (weight 0.1, RSICD labels)",
        with_changes(LITE2_MPNET, intra_class_weight=0.1),
    ),
    Row("Lite2 + mpnet + SMR", "SMR re-rank k=10 of the chosen epoch", LITE2_MPNET, rerank_k=10),
    Row(
        "default msa-lite0-minilm",
        "msa-lite0-minilm through Ray Train: frozen Lite0, MLP fusion, two MiniLM layers fine-tuned",
        preset="msa-lite0-minilm",
    ),
    *(
        Row(
            f"msa-lite0-minilm + {name}",
            f"{name} on the cached features (MSCMAT over the cached MiniLM token states)"
            if terms
            else "the MSA-term rows' model and cache, no term reading MSCMAT (so it is left untrained)",
            preset="msa-lite0-minilm",
            overrides=("model.mscmat=true", *terms),
        )
        for name, terms in (
            ("no MSA term", ()),  # the baseline of the rows below
            ("L_MSCMA", ("loss.mscma_weight=15",)),
            ("L_CSMMC", ("loss.csmmc_weight=10",)),
            ("L_tri", ("loss.triplet_weight=1",)),
            ("MSA's three terms", ("loss.triplet_weight=1", "loss.mscma_weight=15", "loss.csmmc_weight=10")),
        )
    ),
    Row(
        "Lite2 + mpnet, block 6 + head fine-tuned",
        "through Ray Train: Lite2's last block and 1x1 head trained from cached block-5 maps (lr 1e-4)",
        preset="msa-lite2-mpnet",
        overrides=("model.freeze_image_stages=4", "train.backbone_lr=1e-4", "train.epochs=20"),
        rerank_k=10,
    ),
]


@dataclass
class Ablation:
    """Runs rows, keeps every finished (row, seed) in ``results`` and on disk."""

    out_dir: Path
    corpus: Corpus | None = None
    pipeline: Callable[[Row, int], dict[str, Any]] | None = None
    feature_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.out_dir / "ablation.json"

    def load(self) -> dict[str, Any]:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def save(self, results: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(self.path)

    def run(self, rows: list[Row]) -> dict[str, Any]:
        results = self.load()
        for row in rows:
            entry = results.setdefault(row.name, {"what": row.what, "seeds": {}})
            for seed in row.seeds:
                if str(seed) in entry["seeds"]:
                    continue
                started = time.monotonic()
                outcome = self._heads(row, seed) if row.heads is not None else self._pipeline(row, seed)
                outcome["run_s"] = time.monotonic() - started
                entry["seeds"][str(seed)] = outcome
                entry["summary"] = summarise(entry["seeds"])
                self.save(results)
                print(f"{row.name} seed {seed}: test mR {outcome['test']['mR']:.2f} val {outcome['val']['mR']:.2f}")
        return results

    def _heads(self, row: Row, seed: int) -> dict[str, Any]:
        assert self.corpus is not None and row.heads is not None
        outcome = train_heads(self.corpus, row.heads, seed, rerank_k=row.rerank_k)
        outcome["wall_s"] = (
            self.corpus.seconds(row.heads.image) + self.corpus.seconds(row.heads.text) + outcome["train_s"]
        )
        return outcome

    def _pipeline(self, row: Row, seed: int) -> dict[str, Any]:
        if self.pipeline is None:
            raise ValueError(f"row {row.name!r} trains through the pipeline, but no pipeline runner was given")
        return self.pipeline(row, seed)


def summarise(seeds: dict[str, Any]) -> dict[str, Any]:
    """Mean and (with several seeds) standard deviation of every metric over seeds."""
    out: dict[str, Any] = {"seeds": len(seeds)}
    for part in ("test", "val", "test_rerank", "val_rerank"):
        if all(part in s for s in seeds.values()):
            for key in METRIC_KEYS:
                values = [s[part][key] for s in seeds.values()]
                out[f"{part}_{key}"] = statistics.fmean(values)
                out[f"{part}_{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    out["wall_s"] = statistics.fmean(s["wall_s"] for s in seeds.values())
    return out


def markdown(results: dict[str, Any], floor: str = "floor") -> str:
    """The ablation table: test R@K, mR (± std over seeds), Δ to the floor, val mR, wall-clock."""
    columns = ["row", "what", "seeds", "i2t R@1", "t2i R@1", "test mR", "Δ floor", "val mR", "wall min"]
    head = "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"
    base = results.get(floor, {}).get("summary", {}).get("test_mR")
    lines = [head]
    for name, entry in results.items():
        s = entry.get("summary")
        if not s:
            continue
        prefix = "test_rerank" if "test_rerank_mR" in s else "test"
        val = s["val_rerank_mR"] if "val_rerank_mR" in s else s["val_mR"]
        mr = f"{s[f'{prefix}_mR']:.2f}" + (f" ± {s[f'{prefix}_mR_std']:.2f}" if s["seeds"] > 1 else "")
        delta = "" if base is None else f"{s[f'{prefix}_mR'] - base:+.2f}"
        lines.append(
            f"| {name} | {entry['what']} | {s['seeds']} | {s[f'{prefix}_i2t_r1']:.2f} | {s[f'{prefix}_t2i_r1']:.2f} "
            f"| {mr} | {delta} | {val:.2f} | {s['wall_s'] / 60:.1f} |"
        )
    return "\n".join(lines) + "\n"


def bar_chart(results: dict[str, Any], path: Path, references: dict[str, float]) -> None:
    """Test mR per row (error bars: std over seeds) beside published results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, means, stds = [], [], []
    for name, entry in results.items():
        s = entry.get("summary")
        if s:
            prefix = "test_rerank" if "test_rerank_mR" in s else "test"
            names.append(name)
            means.append(s[f"{prefix}_mR"])
            stds.append(s[f"{prefix}_mR_std"])
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 2.4))
    y = np.arange(len(names))
    ax.barh(y, means, xerr=stds, color="#4c78a8")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    styles = ["--", ":", "-.", (0, (5, 1)), (0, (1, 3))]
    for (label, value), style in zip(references.items(), styles * len(references), strict=False):
        ax.axvline(value, linestyle=style, linewidth=1.2, color="#c44", label=f"{label}: {value:.2f}")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.4, -0.12), ncol=2, frameon=False)
    ax.set_xlabel("RSICD test mR (ours: mean ± std over seeds; lines: published / DESIGN.md)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

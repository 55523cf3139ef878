"""Ray Data's tasks and actors import these modules when they start: model libraries there cost seconds each time."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        # decode tasks (embedding, evaluation): ~5 s of imports there competed with the actors loading the model
        ("rsitr.data.preprocess", ["torch", "transformers", "timm"]),
        # the frozen-prefix cache's training and evaluation tasks
        ("rsitr.data.cached_rows", ["torch", "transformers", "timm"]),
        # the embedding's read tasks, which decode too
        ("rsitr.data.shard_reads", ["torch", "transformers", "timm"]),
        # the embedding actors: the image side alone needs neither the tokenizers nor Ray Data's pipelines
        ("rsitr.retrieval.embedders", ["transformers", "timm", "rsitr.data.streams"]),
        # the frozen-prefix cache's read tasks (a whole run's epochs)
        ("rsitr.data.run_rows", ["torch", "transformers", "timm"]),
        # the training and evaluation pipelines' tokenizing actors: tokenizers, not the image or text models
        ("rsitr.data.streams", ["timm", "transformers.modeling_utils"]),
    ],
)
def test_data_modules_import_no_model_library(module: str, absent: list[str]) -> None:
    probe = f"import sys, {module}; print(sorted(set({absent!r}) & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "[]\n"

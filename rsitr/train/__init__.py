"""Distributed MSA training with Ray Train; ``python -m rsitr.train`` is the Ray job entry point.

Each worker reads its share of the training split from Ray Data (decoded and tokenised there, or read from the
frozen-prefix cache), trains the model under DDP (gloo on CPU, NCCL on GPU) and reports every epoch. Rank 0
evaluates the whole validation split, writes the checkpoint and logs; the best checkpoint by val mR is kept, and
test is evaluated once at the end.

Modules: :mod:`~rsitr.train.command` (arguments → config → fit), :mod:`~rsitr.train.trainer` (the Ray Train
run), :mod:`~rsitr.train.loop` (the per-worker loop), :mod:`~rsitr.train.step` (one optimizer step and its log),
:mod:`~rsitr.train.feed` (the streams that feed the loop), :mod:`~rsitr.train.optim`, :mod:`~rsitr.train.losses`.
Nothing outside ``rsitr.train`` (but the CLI's ``train`` command) imports it: the model library never does.
"""

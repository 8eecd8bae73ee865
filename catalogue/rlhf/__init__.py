"""Asynchronous off-policy RLHF: ``AsyncOnlineDPOTrainer`` (a subclass of trl's
``OnlineDPOTrainer``) that learns from samples an older policy generated, synchronously in
rounds of ``off_policy_steps`` mini-batches or with generation in a separate worker process.

This ``__init__`` imports nothing optional; the trainer lives in :mod:`.async_online_dpo`
and needs the ``rlhf`` extra (trl, datasets).
"""

from __future__ import annotations

EXPERIMENTS: list = []  # the async-online-dpo miniature is not written yet (see docs/catalogue/rlhf.md)

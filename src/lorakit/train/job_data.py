"""The data of a ``lorakit train`` job: train and eval datasets from its settings, every check before the model.

The task and the data layout are resolved here (from the columns, unless given), the eval set is the
``--eval-data`` file or ``eval_split`` of ``--data`` held out (none with ``eval_strategy = "no"``), and
TRL's loss switches apply.
"""

from __future__ import annotations

import dataclasses

import torch

from lorakit.data import Columns, TokenDataset, classification_dataset, detect_layout, load_dataset, vader_split
from lorakit.data.builtin import LABELS
from lorakit.data.files import read_records
from lorakit.data.formats import infer_task
from lorakit.train.settings import JobSettings

BUILTIN_DATA = "vader"


def build_data(job: JobSettings, tok) -> tuple[JobSettings, TokenDataset, TokenDataset | None]:
    """``(job with task and layout resolved, train, eval)`` datasets. Every data check happens here,
    before the model is built; ``eval`` is ``None`` when nothing is evaluated (``eval_strategy = "no"``,
    or no eval data and ``eval_split = 0``).

    Raises:
        ValueError: bad data, or ``eval_strategy = "no"`` together with ``eval_data``.
    """
    max_len = job.max_length
    if job.eval_strategy == "no" and job.eval_data:
        raise ValueError(f"eval_strategy 'no' and eval_data {job.eval_data!r} contradict each other; drop one")
    if job.data == BUILTIN_DATA:
        if (job.task or "seq-cls") != "seq-cls":
            raise ValueError("the built-in VADER data is for --task seq-cls")
        job = dataclasses.replace(job, task="seq-cls", layout="classification")
        tr, te = vader_split()
        src = "vaderSentiment/vader_lexicon.txt"
        train = _loss_mask(job, classification_dataset(tr, tok, src, label_names=LABELS, max_length=max_len or 16))
        ev = None if job.eval_strategy == "no" else \
            classification_dataset(te, tok, src, label_names=LABELS, max_length=max_len or 16)
        return job, train, ev
    columns = Columns.from_settings(job.to_dict())
    records = read_records(job.data)
    task = job.task or infer_task(records, columns, job.data)
    job = dataclasses.replace(job, task=task, layout=detect_layout(records[0], columns, task))
    kw = {"max_length": max_len or 512, "columns": columns}
    train = _loss_mask(job, load_dataset(job.data, tok, job.task, label_names=job.labels, **kw))
    if job.eval_data:
        ev = load_dataset(job.eval_data, tok, job.task, label_names=train.label_names or None, **kw)
        return job, train, _loss_mask(job, ev)
    if not job.eval_split or job.eval_strategy == "no":
        return job, train, None
    n_eval = max(1, int(round(job.eval_split * len(train))))
    if n_eval >= len(train):
        raise ValueError(f"{job.data}: {len(train)} example(s) are too few to hold out eval_split={job.eval_split}; "
                         "give --eval-data or --eval-split 0")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(job.seed)).tolist()
    return job, train.subset(perm[n_eval:]), train.subset(perm[:n_eval])


# TRL's loss switches and the layouts they apply to (lorakit's default, like TRL's for completions: True)
LOSS_SWITCHES = {"completion_only_loss": ("prompt-completion", "alpaca"), "assistant_only_loss": ("chat",)}


def _loss_mask(job: JobSettings, ds: TokenDataset) -> TokenDataset:
    """``ds``, with the loss on every token where a switch of :data:`LOSS_SWITCHES` is ``False``
    (TRL's ``completion_only_loss=False`` / ``assistant_only_loss=False``: ``labels = input_ids``).

    Raises:
        ValueError: a switch set for data it does not apply to (it would be ignored).
    """
    for name, layouts in LOSS_SWITCHES.items():
        value = getattr(job, name)
        if value is None:
            continue
        if job.layout not in layouts:
            raise ValueError(f"{name} applies to {' and '.join(layouts)} data; {job.data} is {job.layout!r} data, "
                             f"so it would be ignored: leave it out")
        if value is False:
            ds = dataclasses.replace(ds, examples=[{**e, "labels": list(e["input_ids"])} for e in ds.examples])
    return ds

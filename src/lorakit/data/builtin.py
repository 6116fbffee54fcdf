"""The embedded default task: word sentiment from the VADER lexicon.

VADER (Hutto & Gilbert, 2014) ships ``vader_lexicon.txt`` in the ``vaderSentiment`` package:
one line per token, ``token TAB mean TAB std TAB [ten human ratings in -4..4]``. Words with a
clear polarity (``|mean| >= 1``) become examples ``text = token``, ``label = "positive"`` if
``mean > 0`` else ``"negative"`` — 5,596 real, human-labelled examples. Only words count
(letters, inner hyphens and apostrophes: ``"heartbroken"``, ``"self-confident"``); the lexicon's 234
emoticons and symbol strings (``":-)"``, ``"</3"``, ``"$:"``) are left out. A fixed split (seed
0, independent of the training seed) holds out 1,000 of them for testing.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

LABELS = ["negative", "positive"]
TEST_SIZE = 1000
SPLIT_SEED = 0
WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def vader_lexicon_path() -> str:
    """Path of ``vader_lexicon.txt`` inside the installed ``vaderSentiment`` package.

    Raises:
        FileNotFoundError: the package is not installed (``pip install 'lorakit[demo]'``).
    """
    try:
        import vaderSentiment
    except ImportError:
        raise FileNotFoundError("the built-in dataset needs the vaderSentiment package: "
                                "pip install 'lorakit[demo]' (or pip install vaderSentiment)") from None
    path = os.path.join(os.path.dirname(vaderSentiment.__file__), "vader_lexicon.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed vaderSentiment package")
    return path


def vader_records(min_abs_mean: float = 1.0) -> list[dict[str, Any]]:
    """``[{"text": word, "label": "positive"|"negative", "_line": n}, ...]`` in file order (words
    only, see the module docstring)."""
    path = vader_lexicon_path()
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2:
                continue
            token, mean = parts[0], float(parts[1])
            if abs(mean) >= min_abs_mean and WORD.fullmatch(token):
                records.append({"text": token, "label": LABELS[int(mean > 0)], "_line": n})
    return records


def vader_split(test_size: int = TEST_SIZE) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test) records: a fixed permutation (seed 0), the first ``test_size`` are the test set."""
    records = vader_records()
    perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    test = [records[i] for i in perm[:test_size]]
    train = [records[i] for i in perm[test_size:]]
    return train, test

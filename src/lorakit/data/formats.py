"""What the columns of a data file hold: the layouts lorakit reads and the column mapping.

Layouts (column names as in the file, or mapped with ``--text-column`` ... ``--messages-column``):

* ``classification``: ``text`` + ``label`` (``--task seq-cls``);
* ``chat``: ``messages``, a list of ``{"role", "content"}``; loss on the assistant turns;
* ``prompt-completion``: ``prompt`` + ``completion``; loss on the completion;
* ``alpaca``: ``instruction`` + ``output`` (+ optional ``input``), rendered with Stanford Alpaca's
  prompt template; loss on the output;
* ``text``: ``text`` alone: plain language modelling, loss on every token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Stanford Alpaca's prompt templates (tatsu-lab/stanford_alpaca, train.py), verbatim
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. "
                          "Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\n{instruction}\n\n### Response:\n")
CAUSAL_LAYOUTS = ("chat", "prompt-completion", "alpaca", "text")


@dataclass(frozen=True)
class Columns:
    """Which column of the file holds what (``--text-column`` and friends)."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    label: str = "label"
    messages: str = "messages"

    @classmethod
    def from_settings(cls, s: dict[str, Any]) -> Columns:
        """From ``text_column``, ``prompt_column``... settings (``None``: the default name)."""
        return cls(**{f: s[f"{f}_column"] for f in cls.__dataclass_fields__ if s.get(f"{f}_column")})

    def describe(self) -> str:
        """The accepted layouts under this mapping, for error messages."""
        return (f"{self.text!r} + {self.label!r} (classification); {self.messages!r} (chat); "
                f"{self.prompt!r} + {self.completion!r}; 'instruction' + 'output' [+ 'input'] (Alpaca); "
                f"{self.text!r} alone (language modelling). Map other names with --text-column, --label-column, "
                "--prompt-column, --completion-column, --messages-column")


def _has(rec: dict[str, Any], *cols: str) -> bool:
    return all(rec.get(c) is not None for c in cols)


def detect_layout(rec: dict[str, Any], columns: Columns, task: str) -> str | None:
    """The layout of one record for ``task`` (``"seq-cls"`` or ``"causal-lm"``); ``None`` if none fits."""
    if task == "seq-cls":
        return "classification" if _has(rec, columns.text, columns.label) else None
    if _has(rec, columns.messages):
        return "chat"
    if _has(rec, columns.prompt, columns.completion):
        return "prompt-completion"
    if _has(rec, "instruction", "output"):
        return "alpaca"
    if _has(rec, columns.text):
        return "text"
    return None


def infer_task(records: list[dict[str, Any]], columns: Columns, path: str) -> str:
    """``"seq-cls"`` when the first record has text + label, ``"causal-lm"`` when it has a causal-LM layout.

    Raises:
        ValueError: no layout fits; the message lists the columns found, the layouts and the mapping flags.
    """
    first = records[0]
    if detect_layout(first, columns, "seq-cls"):
        return "seq-cls"
    if detect_layout(first, columns, "causal-lm"):
        return "causal-lm"
    present = sorted(k for k in first if k != "_line")
    raise ValueError(f"{path}:{first['_line']}: cannot tell what the columns {present} hold. lorakit reads "
                     f"{columns.describe()}")


def alpaca_prompt(rec: dict[str, Any]) -> str:
    """Alpaca's prompt for an ``instruction`` (+ ``input``) record."""
    inp = rec.get("input")
    if inp is not None and str(inp).strip():
        return ALPACA_PROMPT.format(instruction=rec["instruction"], input=inp)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=rec["instruction"])

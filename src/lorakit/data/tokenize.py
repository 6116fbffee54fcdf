"""Turn records (from :mod:`lorakit.data.files`) into a :class:`TokenDataset`.

Classification: ``text`` + ``label`` columns; the label set is given, or taken (sorted) from the
training file; a label outside it is an error naming the line.

Causal-LM supervised fine-tuning (SFT), loss on the answer only:

* ``prompt`` + ``completion``: ``ids = [bos] + tok(prompt) + tok(completion) + [eos]`` and
  ``labels = [-100]·(1 + |prompt|) + tok(completion) + [eos]``;
* ``messages`` (a chat, list of ``{"role", "content"}``): each assistant turn's tokens (and the
  end-of-turn token) carry loss; system / user turns and the role headers do not. With a
  tokenizer that has a ``chat_template`` the template renders the chat; otherwise a plain
  ``"<role>: content"`` layout.

Segments are tokenized separately and concatenated, so the mask is exact by construction.
"""

from __future__ import annotations

from typing import Any

from lorakit.data.dataset import IGNORE_INDEX, TokenDataset
from lorakit.data.files import require_columns


def classification_dataset(records: list[dict[str, Any]], tokenizer, path: str, *, label_names: list[str] | None = None,
                           text_column: str = "text", label_column: str = "label",
                           max_length: int = 128) -> TokenDataset:
    """Tokenize ``text`` and map ``label`` to its index in ``label_names``.

    Args:
        records: from :func:`~lorakit.data.files.read_records`.
        tokenizer: a Hugging Face tokenizer.
        path: the file the records came from (for messages).
        label_names: the valid labels (strings). ``None``: the sorted distinct labels found.
        max_length: truncate longer texts to this many tokens.

    Raises:
        ValueError: a missing column, an empty text, a label outside ``label_names``,
            fewer than two classes; naming the file and line.
    """
    require_columns(records, (text_column, label_column), path)
    if label_names is None:
        label_names = sorted({str(r[label_column]) for r in records})
        if len(label_names) < 2:
            raise ValueError(f"{path}: classification needs at least two distinct labels, found {label_names}")
    index = {name: i for i, name in enumerate(label_names)}
    examples = []
    for rec in records:
        label = str(rec[label_column])
        if label not in index:
            raise ValueError(f"{path}:{rec['_line']}: label {label!r} is not in the label set {label_names}")
        text = str(rec[text_column])
        if not text.strip():
            raise ValueError(f"{path}:{rec['_line']}: column {text_column!r} is empty")
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        examples.append({"input_ids": list(ids), "labels": index[label]})
    return TokenDataset(examples, "seq-cls", pad_id=_pad_id(tokenizer), label_names=list(label_names), source=path)


def sft_dataset(records: list[dict[str, Any]], tokenizer, path: str, *, max_length: int = 1024) -> TokenDataset:
    """Tokenize prompt/completion pairs or chats with loss on the answer tokens only.

    Raises:
        ValueError: a line with neither ``messages`` nor ``prompt``+``completion``, a malformed
            chat, or an answer with no tokens (empty after tokenization, or cut off entirely by
            ``max_length``); naming the file and line.
    """
    examples = []
    for rec in records:
        where = f"{path}:{rec['_line']}"
        if "messages" in rec:
            segments = _chat_segments(rec["messages"], tokenizer, where)
        else:
            require_columns([rec], ("prompt", "completion"), path)
            prompt, completion = str(rec["prompt"]), str(rec["completion"])
            comp = _encode(tokenizer, completion)
            if not comp:
                raise ValueError(f"{where}: the completion {completion!r} is empty after tokenization; "
                                 "there is nothing to learn from this line")
            segments = [(_encode(tokenizer, prompt), False), (comp + _eos(tokenizer), True)]
            bos = tokenizer.bos_token_id
            if bos is not None:
                segments.insert(0, ([bos], False))
        ids, labels = [], []
        for seg, trained in segments:
            ids += seg
            labels += seg if trained else [IGNORE_INDEX] * len(seg)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(t == IGNORE_INDEX for t in labels):
            raise ValueError(f"{where}: no answer token is left within max_length={max_length} "
                             f"(the example has {sum(len(s) for s, _ in segments)} tokens); raise --max-length")
        examples.append({"input_ids": ids, "labels": labels})
    return TokenDataset(examples, "causal-lm", pad_id=_pad_id(tokenizer), source=path)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _chat_segments(messages: Any, tokenizer, where: str) -> list[tuple[list[int], bool]]:
    """(token ids, carries loss) segments of a chat; the assistant turns carry loss."""
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}} objects")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the chat has no 'assistant' turn; there is nothing to learn from this line")
    if getattr(tokenizer, "chat_template", None):
        return _templated_segments(messages, tokenizer, where)
    segments: list[tuple[list[int], bool]] = []
    if tokenizer.bos_token_id is not None:
        segments.append(([tokenizer.bos_token_id], False))
    for m in messages:
        header = _encode(tokenizer, f"{m['role']}: ")
        body = _encode(tokenizer, m["content"])
        if m["role"] == "assistant":
            if not body:
                raise ValueError(f"{where}: an assistant turn is empty after tokenization")
            segments += [(header, False), (body + _eos(tokenizer), True)]
        else:
            segments.append((header + body + _encode(tokenizer, "\n"), False))
    return segments


def _templated_segments(messages: list[dict], tokenizer, where: str) -> list[tuple[list[int], bool]]:
    """Render with the tokenizer's chat template; an assistant turn is the difference between the
    chat up to it (with the generation prompt) and the chat including it."""
    segments: list[tuple[list[int], bool]] = []
    done: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _template_ids(tokenizer, messages[:i], add_generation_prompt=True)
        full = _template_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if prefix[: len(done)] != done or full[: len(prefix)] != prefix:
            raise ValueError(f"{where}: the tokenizer's chat template does not render this chat incrementally; "
                             "give prompt/completion columns instead")
        if len(full) == len(prefix):
            raise ValueError(f"{where}: assistant turn {i} is empty after tokenization")
        segments += [(prefix[len(done):], False), (full[len(prefix):], True)]
        done = full
    return segments


def _template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=True)
    return list(out["input_ids"])

"""Turn records (from :mod:`lorakit.data.files`) into a :class:`TokenDataset`.

Classification: ``text`` + ``label`` columns; the label set is given, or taken (sorted) from the
training file; a label outside it is an error naming the line.

Causal-LM supervised fine-tuning (SFT), loss on the answer only (layouts: :mod:`lorakit.data.formats`):

* ``prompt`` + ``completion``: ``ids = [bos] + tok(prompt) + tok(completion) + [eos]`` and
  ``labels = [-100]·(1 + |prompt|) + tok(completion) + [eos]``; Alpaca records are the same with
  the prompt rendered by Alpaca's template;
* ``messages`` (a chat, list of ``{"role", "content"}``): each assistant turn's tokens (and the
  end-of-turn token) carry loss; system / user turns and the role headers do not. With a
  tokenizer that has a ``chat_template`` the template renders the chat; otherwise a plain
  ``"<role>: content"`` layout;
* ``text`` alone: ``[bos] + tok(text) + [eos]``, loss on every token.

Segments are tokenized separately and concatenated, so the mask is exact by construction.

Over-long examples: an example longer than ``max_length`` is truncated; one whose answer is cut
off entirely is skipped. Both are counted in :attr:`TokenDataset.notes` (with their lines) rather
than aborting the run; only a file in which no example keeps an answer token is an error.
"""

from __future__ import annotations

from typing import Any

from lorakit.data.dataset import IGNORE_INDEX, TokenDataset
from lorakit.data.files import require_columns
from lorakit.data.formats import Columns, alpaca_prompt, detect_layout


def _lines(recs: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(n) for n in recs[:limit])
    return shown + (f" and {len(recs) - limit} more" if len(recs) > limit else "")


def classification_dataset(records: list[dict[str, Any]], tokenizer, path: str, *, label_names: list[str] | None = None,
                           text_column: str = "text", label_column: str = "label",
                           max_length: int = 128) -> TokenDataset:
    """Tokenize ``text`` and map ``label`` to its index in ``label_names``.

    Args:
        records: from :func:`~lorakit.data.files.read_records`.
        tokenizer: a Hugging Face tokenizer.
        path: the file the records came from (for messages).
        label_names: the valid labels (strings). ``None``: the sorted distinct labels found.
        text_column / label_column: the columns holding the text and the label.
        max_length: truncate longer texts to this many tokens (counted in ``notes``).

    Raises:
        ValueError: a missing column, an empty text, a label outside ``label_names``,
            fewer than two classes; naming the file and line.
    """
    hint = (f"classification reads a text and a label column; map yours with --text-column / --label-column "
            f"(now {text_column!r} / {label_column!r})")
    require_columns(records, (text_column, label_column), path, hint)
    if label_names is None:
        label_names = sorted({str(r[label_column]) for r in records})
        if len(label_names) < 2:
            raise ValueError(f"{path}: classification needs at least two distinct labels, found {label_names}")
    index = {name: i for i, name in enumerate(label_names)}
    examples, truncated = [], []
    for rec in records:
        label = str(rec[label_column])
        if label not in index:
            raise ValueError(f"{path}:{rec['_line']}: label {label!r} is not in the label set {label_names}")
        text = str(rec[text_column])
        if not text.strip():
            raise ValueError(f"{path}:{rec['_line']}: column {text_column!r} is empty")
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) >= max_length and len(tokenizer(text)["input_ids"]) > max_length:
            truncated.append(rec["_line"])
        examples.append({"input_ids": list(ids), "labels": index[label]})
    notes = [f"{path}: {len(truncated)} of {len(records)} texts were longer than max_length={max_length} tokens and "
             f"were truncated (lines {_lines(truncated)}); raise --max-length to keep them whole"] if truncated else []
    return TokenDataset(examples, "seq-cls", pad_id=_pad_id(tokenizer), label_names=list(label_names), source=path,
                        notes=notes)


def sft_dataset(records: list[dict[str, Any]], tokenizer, path: str, *, max_length: int = 1024,
                columns: Columns | None = None) -> TokenDataset:
    """Tokenize chats, prompt/completion pairs, Alpaca records or plain texts, with loss on the answer.

    Raises:
        ValueError: a line with no causal-LM layout, a malformed chat, an empty answer, or a file
            in which every example loses its whole answer to ``max_length``; naming the file and line.
    """
    columns = columns or Columns()
    examples, truncated, skipped = [], [], []
    first_skip = ""
    for rec in records:
        where = f"{path}:{rec['_line']}"
        segments = _segments(rec, tokenizer, where, columns)
        ids, labels = [], []
        for seg, trained in segments:
            ids += seg
            labels += seg if trained else [IGNORE_INDEX] * len(seg)
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            if all(t == IGNORE_INDEX for t in labels):
                skipped.append(rec["_line"])
                first_skip = first_skip or (f"{where}: no answer token is left within max_length={max_length} "
                                            f"(the example has {sum(len(s) for s, _ in segments)} tokens)")
                continue
            truncated.append(rec["_line"])
        examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise ValueError(f"{first_skip}; every example of the file loses its answer to truncation: raise --max-length")
    notes = []
    if truncated:
        notes.append(f"{path}: {len(truncated)} of {len(records)} examples were longer than max_length={max_length} "
                     f"tokens and were truncated (lines {_lines(truncated)}); raise --max-length to keep them whole")
    if skipped:
        notes.append(f"{path}: {len(skipped)} of {len(records)} examples were skipped: their answer starts after "
                     f"max_length={max_length} tokens (lines {_lines(skipped)})")
    return TokenDataset(examples, "causal-lm", pad_id=_pad_id(tokenizer), source=path, notes=notes)


def _segments(rec: dict[str, Any], tokenizer, where: str, columns: Columns) -> list[tuple[list[int], bool]]:
    """(token ids, carries loss) segments of one causal-LM record."""
    layout = detect_layout(rec, columns, "causal-lm")
    if layout is None:
        present = sorted(k for k in rec if k != "_line")
        pairs = {columns.prompt: columns.completion, columns.completion: columns.prompt, "instruction": "output",
                 "output": "instruction", columns.label: columns.text}
        half = next((c for c in present if c in pairs), None)
        if half is not None:
            raise ValueError(f"{where}: missing column {pairs[half]!r} (this line has {present}); "
                             f"lorakit reads {columns.describe()}")
        raise ValueError(f"{where}: no causal-LM layout fits the columns {present}; lorakit reads {columns.describe()}")
    if layout == "chat":
        return _chat_segments(rec[columns.messages], tokenizer, where)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if layout == "text":
        body = _encode(tokenizer, str(rec[columns.text]))
        if not body:
            raise ValueError(f"{where}: the text is empty after tokenization; there is nothing to learn from this line")
        return [(bos, False), (body + _eos(tokenizer), True)]
    if layout == "alpaca":
        prompt, completion, name = alpaca_prompt(rec), str(rec["output"]), "output"
    else:
        prompt, completion, name = str(rec[columns.prompt]), str(rec[columns.completion]), "completion"
    comp = _encode(tokenizer, completion)
    if not comp:
        raise ValueError(f"{where}: the {name} {completion!r} is empty after tokenization; "
                         "there is nothing to learn from this line")
    return [(bos, False), (_encode(tokenizer, prompt), False), (comp + _eos(tokenizer), True)]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The token ids a prompt had in training (``[bos] + tok(prompt)``), for generation: the BOS
    is not doubled when the prompt's text already starts with it."""
    ids = _encode(tokenizer, prompt)
    bos = tokenizer.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos] + ids


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The token ids of a chat up to the assistant's next turn, rendered as in training: the chat
    template with the generation prompt when the tokenizer has one, else the plain layout.

    Raises:
        ValueError: a malformed chat.
    """
    _check_chat(messages, "the chat")
    if getattr(tokenizer, "chat_template", None):
        return _template_ids(tokenizer, messages, add_generation_prompt=True)
    ids = [t for seg, _ in _plain_chat_segments(messages, tokenizer, "the chat") for t in seg]
    return ids + _encode(tokenizer, "assistant: ")


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
    _check_chat(messages, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the chat has no 'assistant' turn; there is nothing to learn from this line")
    if getattr(tokenizer, "chat_template", None):
        return _templated_segments(messages, tokenizer, where)
    return _plain_chat_segments(messages, tokenizer, where)


def _plain_chat_segments(messages: list[dict], tokenizer, where: str) -> list[tuple[list[int], bool]]:
    """``[bos] "role: content\\n" ...`` with each assistant reply ending in eos (no chat template)."""
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


def _check_chat(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}} objects")


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

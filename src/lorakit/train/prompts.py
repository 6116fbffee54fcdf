"""Prompts for generation, as the run was trained: templates, input records, and where a reply ends.

* :func:`format_prompt`: an Alpaca run's prompts go through Alpaca's template (the instruction, and
  ``--input`` when given), exactly as training rendered each record;
* :func:`read_prompt_records`: a file of prompts read with ``lorakit train``'s readers (JSONL, JSON,
  CSV/TSV, Parquet...), one record per prompt in any training layout — the way to give multi-line
  prompts, Alpaca inputs or whole chats;
* :func:`terminators`: the tokens at which a reply ends — the model's ``generation_config``
  end tokens (e.g. Qwen's ``[<|im_end|>, <|endoftext|>]``), the tokenizer's EOS (which training
  appended to every completion) and, for a chat, the template's end-of-turn token (which training
  put the loss on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorakit.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, Columns


@dataclass(frozen=True)
class PromptItem:
    """One thing to complete: a plain ``prompt`` (already formatted) or chat ``messages``; ``shown``
    is what ``--json`` echoes as the prompt."""

    shown: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None


def format_prompt(text: str, layout: str | None, *, input_text: str | None = None, template: bool = True) -> str:
    """``text`` as the run saw its prompts: Alpaca's template around it (``text`` the instruction,
    ``input_text`` the input) for a run trained on Alpaca data; the text itself otherwise.

    Raises:
        ValueError: ``input_text`` for a run whose prompts have no input field.
    """
    if layout == "alpaca" and template:
        if input_text:
            return ALPACA_PROMPT.format(instruction=text, input=input_text)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=text)
    if input_text is not None:
        raise ValueError("--input is the 'input' field of Alpaca prompts; this run was not trained on Alpaca data "
                         "(or --no-template was given)")
    return text


def item_from_record(rec: dict[str, Any], columns: Columns, where: str, *, template: bool = True,
                     system: str | None = None) -> PromptItem:
    """A prompt record of a file, in any training layout: ``messages`` (a chat up to the reply wanted;
    trailing assistant turns, e.g. the gold answer, are dropped), ``instruction`` [+ ``input``]
    (Alpaca's template), the prompt column or the text column.

    Raises:
        ValueError: a record with none of those columns, naming the line.
    """
    if rec.get(columns.messages) is not None:
        messages = list(rec[columns.messages])
        while messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages.pop()
        if system is not None:
            messages = [{"role": "system", "content": system}] + messages
        last = next((m.get("content", "") for m in reversed(messages) if isinstance(m, dict)), "")
        return PromptItem(str(last), messages=messages)
    if rec.get("instruction") is not None:
        instruction, inp = str(rec["instruction"]), rec.get("input")
        return PromptItem(instruction, prompt=format_prompt(instruction, "alpaca", input_text=str(inp) if inp else None,
                                                            template=template))
    for col in (columns.prompt, columns.text):
        if rec.get(col) is not None:
            return PromptItem(str(rec[col]), prompt=str(rec[col]))
    present = sorted(k for k in rec if k != "_line")
    raise ValueError(f"{where}: no prompt in columns {present}; give {columns.messages!r} (a chat), 'instruction' "
                     f"[+ 'input'] (Alpaca), {columns.prompt!r} or {columns.text!r} (map names with --prompt-column, "
                     "--text-column, --messages-column)")


def read_prompt_records(path: str, columns: Columns, *, template: bool = True,
                        system: str | None = None) -> list[PromptItem]:
    """The prompts of a data file (any format ``lorakit train`` reads), one per record.

    Raises:
        FileNotFoundError / ValueError: as :func:`lorakit.data.files.read_records`, or a record without a prompt.
    """
    from lorakit.data.files import read_records

    return [item_from_record(r, columns, f"{path}:{r['_line']}", template=template, system=system)
            for r in read_records(path)]


def end_of_turn_id(tok) -> int | None:
    """The special token that closes an assistant turn in the tokenizer's chat template (ChatML's
    ``<|im_end|>``, Llama 3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``), found by rendering a
    one-turn chat: the first special token after the reply's text. ``None`` without a template."""
    if not getattr(tok, "chat_template", None):
        return None
    reply = "Hello"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
    try:
        prefix = tok.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=True, return_dict=True)
        full = tok.apply_chat_template(chat, add_generation_prompt=False, tokenize=True, return_dict=True)
    except Exception:  # noqa: BLE001 - a template that cannot render this chat names no end-of-turn token
        return None
    prefix, full = list(prefix["input_ids"]), list(full["input_ids"])
    tail = full[len(prefix):] if full[:len(prefix)] == prefix else full
    body = list(tok(reply, add_special_tokens=False)["input_ids"])
    if tail[:len(body)] == body:
        tail = tail[len(body):]
    special = set(tok.all_special_ids) | set(tok.get_added_vocab().values())
    return next((t for t in tail if t in special), None)


def terminators(model, tok, chat: bool = False) -> list[int]:
    """The token ids that end a reply (see the module docstring), without repeats."""
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            ids += [eos] if isinstance(eos, int) else list(eos)
            break
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    if chat:
        eot = end_of_turn_id(tok)
        if eot is not None:
            ids.append(eot)
    return list(dict.fromkeys(int(i) for i in ids))

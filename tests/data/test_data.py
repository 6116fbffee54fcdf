"""Data loading: per-line errors before training, exact SFT loss masks, batching, the VADER split."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lorakit.data import IGNORE_INDEX, batch_order, collate, load_dataset, vader_records, vader_split
from lorakit.models import char_tokenizer


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# ---------------------------------------------------------------- errors name the file and line
def test_missing_file(tmp_path, tok):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_dataset(path, tok, "causal-lm")


def test_empty_file(tmp_path, tok):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: the file holds no examples"):
        load_dataset(str(path), tok, "causal-lm")


def test_empty_csv(tmp_path, tok):
    path = tmp_path / "empty.csv"
    path.write_text("text,label\n")
    with pytest.raises(ValueError, match=r"empty\.csv: the file holds no examples"):
        load_dataset(str(path), tok, "seq-cls")


def test_missing_column_names_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: missing column 'completion'"):
        load_dataset(path, tok, "causal-lm")


def test_missing_column_csv(tmp_path, tok):
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood,pos\nbad,neg\n")
    with pytest.raises(ValueError, match=r"d\.csv:2: missing column 'sentence'"):
        from lorakit.data import classification_dataset, read_records

        classification_dataset(read_records(str(path)), tok, str(path), text_column="sentence")


def test_label_outside_label_set(tmp_path, tok):
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "meh", "label": "neutral"}]
    path = write_jsonl(tmp_path / "cls.jsonl", rows)
    with pytest.raises(ValueError, match=r"cls\.jsonl:3: label 'neutral' is not in the label set \['neg', 'pos'\]"):
        load_dataset(path, tok, "seq-cls", label_names=["neg", "pos"])


def test_non_utf8_names_line(tmp_path, tok):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: text is not valid UTF-8"):
        load_dataset(str(path), tok, "seq-cls")


def test_completion_empty_after_tokenization(tmp_path, tok):
    rows = [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": ""}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    with pytest.raises(ValueError, match=r"sft\.jsonl:2: the completion '' is empty after tokenization"):
        load_dataset(path, tok, "causal-lm")


def test_bad_json_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, '{"prompt": '])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        load_dataset(path, tok, "causal-lm")


def test_single_class_refused(tmp_path, tok):
    path = write_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    with pytest.raises(ValueError, match="at least two distinct labels"):
        load_dataset(path, tok, "seq-cls")


# ---------------------------------------------------------------- SFT loss masks
def test_prompt_and_padding_carry_no_loss(tmp_path, tok):
    rows = [{"prompt": "abc", "completion": "xy"}, {"prompt": "hello ", "completion": "world!"}]
    ds = load_dataset(write_jsonl(tmp_path / "sft.jsonl", rows), tok, "causal-lm")
    batch = collate(list(ds.examples), ds.task, ds.pad_id)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    for i, r in enumerate(rows):
        # independent reference: the char tokenizer maps one character to one token
        prompt_ids = [bos] + [tok.convert_tokens_to_ids(c) for c in r["prompt"]]
        comp_ids = [tok.convert_tokens_to_ids(c) for c in r["completion"]] + [eos]
        n = len(prompt_ids) + len(comp_ids)
        T = batch["input_ids"].shape[1]
        assert batch["input_ids"][i, :n].tolist() == prompt_ids + comp_ids
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        expected = [IGNORE_INDEX] * len(prompt_ids) + comp_ids + [IGNORE_INDEX] * (T - n)
        assert batch["labels"][i].tolist() == expected


def test_chat_messages_loss_on_assistant_turns_only(tmp_path, tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
    ds = load_dataset(write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}]), tok, "causal-lm")
    ex = ds[0]
    trained = "".join(tok.convert_ids_to_tokens([t for t in ex["labels"] if t != IGNORE_INDEX]))
    assert trained == "yo</s>ok</s>"
    text = "".join(tok.convert_ids_to_tokens(ex["input_ids"]))
    assert text == "<s>user: hi\nassistant: yo</s>user: again\nassistant: ok</s>"


def test_chat_without_assistant_refused(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match=r"chat\.jsonl:1: the chat has no 'assistant' turn"):
        load_dataset(path, tok, "causal-lm")


def test_truncation_that_removes_the_answer_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p" * 50, "completion": "answer"}])
    with pytest.raises(ValueError, match=r"long\.jsonl:1: no answer token is left within max_length=20"):
        load_dataset(path, tok, "causal-lm", max_length=20)


def test_csv_classification(tmp_path, tok):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"good, really",pos\nbad,neg\n')
    ds = load_dataset(str(path), tok, "seq-cls")
    assert ds.label_names == ["neg", "pos"]
    assert [e["labels"] for e in ds.examples] == [1, 0]


# ---------------------------------------------------------------- batching
def test_batch_order_is_a_seeded_permutation_grouped_by_length():
    lengths = [int(x) for x in torch.randint(1, 100, (1000,), generator=torch.Generator().manual_seed(1))]
    a = batch_order(lengths, 8, seed=3, epoch=1)
    assert a == batch_order(lengths, 8, seed=3, epoch=1)
    assert a != batch_order(lengths, 8, seed=3, epoch=2)
    flat = sorted(i for b in a for i in b)
    assert flat == list(range(1000))
    # grouping: the padded size (max length x batch) is far below that of random batches
    padded = sum(max(lengths[i] for i in b) * len(b) for b in a)
    rand = sum(max(lengths[i] for i in b) * len(b) for b in batch_order(lengths, 8, 3, 1, group_by_length=False))
    assert padded < 0.7 * rand


# ---------------------------------------------------------------- the built-in VADER data
def test_vader_records_follow_the_lexicon():
    """Every word of the lexicon with |mean| >= 1, labelled by the sign of its mean; no emoticons."""
    import re

    import vaderSentiment

    path = os.path.join(os.path.dirname(vaderSentiment.__file__), "vader_lexicon.txt")
    expected = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            token, mean = line.split("\t")[:2]
            if abs(float(mean)) >= 1 and re.search("[A-Za-z]", token) and not re.search(r"[^A-Za-z'-]", token):
                expected[token] = "positive" if float(mean) > 0 else "negative"
    recs = vader_records()
    assert {r["text"]: r["label"] for r in recs} == expected
    assert len(recs) == 5596  # the issue's "about 5.6k"
    assert {r["text"] for r in recs} >= {"heartbroken", "cover-up", "self-confident"}
    assert not {r["text"] for r in recs} & {":)", ":-(", "</3", "$:"}
    train, test = vader_split()
    assert len(test) == 1000 and len(train) == len(recs) - 1000
    assert not {r["_line"] for r in train} & {r["_line"] for r in test}
    assert vader_split()[1] == test  # fixed split


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chatml_tokenizer(template: str = CHATML):
    t = char_tokenizer()
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = template
    return t


def test_chat_template_renders_the_chat_and_masks_all_but_assistant_turns(tmp_path):
    """A ChatML template (Qwen's layout): input ids are exactly the template's rendering; the loss
    covers each assistant reply and its end-of-turn marker, never system/user turns or headers."""
    t = chatml_tokenizer()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"},
            {"role": "assistant", "content": "ok"}]
    ex = load_dataset(write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}]), t, "causal-lm")[0]
    rendered = t.apply_chat_template(msgs, tokenize=False)
    assert t.decode(ex["input_ids"]) == rendered
    assert ex["input_ids"] == list(t.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
    trained = t.decode([tok_id for tok_id in ex["labels"] if tok_id != IGNORE_INDEX])
    assert trained == "yo<|im_end|>\nok<|im_end|>\n"
    # positions: every trained token sits where the rendering has the assistant replies
    starts = [i for i, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX and ex["labels"][i - 1] == IGNORE_INDEX]
    assert [t.decode(ex["input_ids"][:s]).endswith("<|im_start|>assistant\n") for s in starts] == [True, True]


def test_chat_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    last_only = ("{% for m in messages %}{% if loop.last %}{{ m['role'] + ':' + m['content'] + '\\n' }}{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}])
    with pytest.raises(ValueError, match=r"chat\.jsonl:1: the tokenizer's chat template does not render this chat"):
        load_dataset(path, chatml_tokenizer(last_only), "causal-lm")

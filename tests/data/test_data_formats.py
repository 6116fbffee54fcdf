"""Data formats (JSON array, TSV, Parquet, Arrow, ``datasets`` directories), layouts (raw text,
Alpaca) and column mappings, over-long examples."""

from __future__ import annotations

import json

import pytest

from lorakit.data import IGNORE_INDEX, Columns, infer_task, load_dataset, read_records
from lorakit.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

ROWS = [{"text": "good day", "label": "pos"}, {"text": "bad day", "label": "neg"}, {"text": "fine", "label": "pos"}]


def chars(tok, s: str) -> list[int]:
    """Independent reference: the char tokenizer maps one character to one token."""
    return [tok.convert_tokens_to_ids(c) for c in s]


def plain(records):
    return [{k: v for k, v in r.items() if k != "_line"} for r in records]


# ---------------------------------------------------------------- issue 11 #16: Unicode line separators
@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85", "\x1c", "\x0b", "\x0c"])
def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path, tok, sep):
    path = tmp_path / "u.jsonl"
    rows = [{"prompt": f"a{sep}b", "completion": "c"}, {"prompt": "d", "completion": f"e{sep}f"}]
    # ensure_ascii=False writes the separator raw, as most JSON writers do; it is valid JSON
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n", encoding="utf-8")
    recs = read_records(path)
    assert plain(recs) == rows and [r["_line"] for r in recs] == [1, 2]
    assert len(load_dataset(str(path), tok, "causal-lm")) == 2


# ---------------------------------------------------------------- formats
def test_json_array_and_tsv(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS, indent=1))
    assert plain(read_records(tmp_path / "a.json")) == ROWS
    (tmp_path / "l.json").write_text("\n".join(json.dumps(r) for r in ROWS))  # HF's .json = JSON lines
    assert plain(read_records(tmp_path / "l.json")) == ROWS
    (tmp_path / "a.tsv").write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in ROWS))
    assert plain(read_records(tmp_path / "a.tsv")) == ROWS
    (tmp_path / "bad.json").write_text('[{"text": "a"}, 3]')
    with pytest.raises(ValueError, match=r"bad\.json: item 2 of the array must be a JSON object"):
        read_records(tmp_path / "bad.json")


def test_parquet_arrow_and_dataset_directories(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert plain(read_records(tmp_path / "d.parquet")) == ROWS
    assert [r["_line"] for r in read_records(tmp_path / "d.parquet")] == [1, 2, 3]
    # save_to_disk: a real datasets Arrow directory, read with load_from_disk; its .arrow file on its own too
    ds.save_to_disk(str(tmp_path / "saved"))
    assert plain(read_records(tmp_path / "saved")) == ROWS
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert plain(read_records(arrow)) == ROWS
    # a DatasetDict: the train split by default, another on request, an unknown one refused
    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert plain(read_records(tmp_path / "dict")) == ROWS
    assert plain(read_records(tmp_path / "dict", split="test")) == ROWS[:1]
    with pytest.raises(ValueError, match=r"no split 'dev'; this dataset has \['test', 'train'\]"):
        read_records(tmp_path / "dict", split="dev")
    # a plain directory of data files: datasets.load_dataset(directory)
    (tmp_path / "files").mkdir()
    ds.to_json(str(tmp_path / "files" / "train.jsonl"))
    assert plain(read_records(tmp_path / "files")) == ROWS


def test_missing_datasets_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(ModuleNotFoundError, match=r"reading \.parquet files needs the 'datasets' package.*\[data\]"):
        read_records(tmp_path / "d.parquet")


# ---------------------------------------------------------------- layouts
def test_raw_text_is_language_modelling_with_loss_on_every_token(tmp_path, tok):
    path = tmp_path / "lm.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    assert infer_task(read_records(path), Columns(), str(path)) == "causal-lm"
    ex = load_dataset(str(path), tok, "causal-lm")[0]
    assert ex["input_ids"] == [tok.bos_token_id] + chars(tok, "hello") + [tok.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] + chars(tok, "hello") + [tok.eos_token_id]


def test_alpaca_records_use_alpacas_template(tmp_path, tok):
    rows = [{"instruction": "Add", "input": "1 2", "output": "3"},
            {"instruction": "Say hi", "input": "", "output": "hi"}]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    ds = load_dataset(str(path), tok, "causal-lm")
    prompts = [ALPACA_PROMPT.format(instruction="Add", input="1 2"),
               ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi")]
    for ex, prompt, out in zip(ds.examples, prompts, ("3", "hi")):
        p = [tok.bos_token_id] + chars(tok, prompt)
        assert ex["input_ids"] == p + chars(tok, out) + [tok.eos_token_id]
        assert ex["labels"] == [IGNORE_INDEX] * len(p) + chars(tok, out) + [tok.eos_token_id]


def test_column_mapping_for_every_column(tmp_path, tok):
    path = tmp_path / "m.jsonl"
    rows = [{"q": "ab", "a": "c"}, {"chat": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
            {"body": "zz"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cols = Columns(prompt="q", completion="a", messages="chat", text="body")
    ds = load_dataset(str(path), tok, "causal-lm", columns=cols)
    trained = ["".join(tok.convert_ids_to_tokens([t for t in e["labels"] if t != IGNORE_INDEX])) for e in ds.examples]
    assert trained == ["c</s>", "y</s>", "zz</s>"]
    cls = tmp_path / "c.csv"
    cls.write_text("sentence,sentiment\ngreat,1\nawful,0\n")
    recs = read_records(cls)
    with pytest.raises(ValueError, match=r"the columns \['sentence', 'sentiment'\] hold.*--text-column"):
        infer_task(recs, Columns(), str(cls))
    assert infer_task(recs, Columns(text="sentence", label="sentiment"), str(cls)) == "seq-cls"
    ds = load_dataset(str(cls), tok, "seq-cls", columns=Columns(text="sentence", label="sentiment"))
    assert ds.label_names == ["0", "1"] and [e["labels"] for e in ds.examples] == [1, 0]
    with pytest.raises(ValueError, match=r"missing column 'text'.*map yours with --text-column"):
        load_dataset(str(cls), tok, "seq-cls")


# ---------------------------------------------------------------- over-long examples
def test_over_long_examples_are_truncated_or_skipped_and_reported(tmp_path, tok):
    rows = [{"prompt": "p", "completion": "short"}, {"prompt": "p" * 30, "completion": "answer"},
            {"prompt": "pp", "completion": "a" * 30}]
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_dataset(str(path), tok, "causal-lm", max_length=20)
    assert len(ds) == 2 and all(len(e["input_ids"]) <= 20 for e in ds.examples)
    assert ds.notes == [
        f"{path}: 1 of 3 examples were longer than max_length=20 tokens and were truncated (lines 3); "
        "raise --max-length to keep them whole",
        f"{path}: 1 of 3 examples were skipped: their answer starts after max_length=20 tokens (lines 2)"]
    cls = tmp_path / "c.jsonl"
    cls.write_text("\n".join(json.dumps(r) for r in [{"text": "x" * 40, "label": "a"}, {"text": "y", "label": "b"}]))
    ds = load_dataset(str(cls), tok, "seq-cls", max_length=10)
    assert len(ds.examples[0]["input_ids"]) == 10 and "1 of 2 texts were longer than max_length=10" in ds.notes[0]

"""predict (batched, streaming, bounded memory), generate (--chat = apply_chat_template + greedy), merge and
export of built-in models, TensorBoard logging, data layouts through ``lorakit train``."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time

import pytest
import torch

import lorakit as lk
from lorakit.cli import main
from lorakit.data.tokenize import prompt_ids
from lorakit.models import char_tokenizer, tiny_llama
from runners import SRC

ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
WORDS = ["good", "great", "fine", "nice", "bad", "awful", "sad", "poor"]


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """A finished seq-cls run on a tiny random BERT with the character tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("cls")
    tok = char_tokenizer()
    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     vocab_size=len(tok), max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    BertForSequenceClassification(cfg).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    data = root / "cls.jsonl"
    data.write_text("".join(json.dumps({"text": w, "label": "pos" if i < 4 else "neg"}) + "\n"
                            for i, w in enumerate(WORDS)) * 2)
    out = root / "run"
    assert main(["train", "--model", str(root / "bert"), "--data", str(data), "--max-steps", "2", "--eval-split", "0",
                 "--max-length", "12", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    return out


def test_predict_cli_equals_the_model_batch_by_batch(cls_run, capsys):
    from lorakit.train.inference import load_trained

    texts = ["good", "awful", "a" * 40, "fine day"]
    assert main(["predict", "--adapter", str(cls_run), "--json", "--batch-size", "3", *texts]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    model, tok, _ = load_trained(str(cls_run), "seq-cls")
    with torch.no_grad():  # one text at a time, truncated to the run's max_length (12)
        for r, t in zip(rows, texts):
            ids = tok(t, truncation=True, max_length=12, return_tensors="pt")
            p = model(**ids).logits.softmax(-1)[0]
            assert r["text"] == t and r["label"] == model.config.id2label[int(p.argmax())]
            assert r["probability"] == pytest.approx(float(p.max()), abs=1e-5)


def _predict(run_dir, n_lines: int) -> tuple[list[dict], float, float]:
    """``lorakit predict --json`` fed ``n_lines`` on stdin: its rows, seconds, and peak RSS (MiB, from wait4)."""
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "predict", "--adapter", str(run_dir), "--json",
                             "--batch-size", "256", "--threads", "1"],
                            env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.read()))
    reader.start()
    t0 = time.perf_counter()
    proc.stdin.write("".join(f"{WORDS[i % len(WORDS)]} {i}\n" for i in range(n_lines)).encode())
    proc.stdin.close()
    reader.join(timeout=300)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0
    return [json.loads(line) for line in got[0].decode().splitlines()], time.perf_counter() - t0, usage.ru_maxrss / 1024


@pytest.mark.slow
def test_predict_ten_thousand_lines_in_bounded_memory(cls_run):
    """10,000 lines from stdin: every line answered, in order, and peak memory as for 100 lines."""
    peaks = {}
    for n in (100, 10_000):
        rows, seconds, peaks[n] = _predict(cls_run, n)
        assert [r["text"] for r in rows] == [f"{WORDS[i % len(WORDS)]} {i}" for i in range(n)]
        print(f"predict {n} lines: {seconds:.1f} s, peak RSS {peaks[n]:.0f} MiB")
    assert peaks[10_000] - peaks[100] < 40, peaks  # one batch at a time, whatever the input's length


@pytest.mark.slow
def test_predict_streams_each_batch_before_the_input_ends(cls_run):
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "predict", "--adapter", str(cls_run), "--batch-size",
                             "4"], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        proc.stdin.write("good\nbad\nfine\nsad\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 120)  # stdin is still open
        assert ready, "no output before the end of the input"
        first = [proc.stdout.readline() for _ in range(4)]
        assert [line.split("\t")[0] for line in first] == ["good", "bad", "fine", "sad"]
    finally:
        proc.stdin.close()
        proc.wait(timeout=120)
    assert proc.returncode == 0


# ---------------------------------------------------------------- generate
@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    model, tok = tiny_llama(hidden_size=32, num_layers=1, seed=1)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": w},
                                                     {"role": "assistant", "content": w[::-1]}]}) + "\n"
                            for w in WORDS))
    out = root / "run"
    assert main(["train", "--model", str(root / "base"), "--data", str(data), "--max-steps", "3", "--lr", "1e-2",
                 "--eval-split", "0", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    return root, out


def greedy(model, ids: list[int], eos: int, n: int) -> list[int]:
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == eos:
                break
            new.append(nxt)
    return new


def test_generate_chat_is_apply_chat_template_plus_greedy(chat_run, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, out = chat_run
    assert json.loads((out / "run_config.json").read_text())["layout"] == "chat"
    capsys.readouterr()
    # a chat-trained run answers in chat mode by default; two prompts, JSON lines
    assert main(["generate", "--adapter", str(out), "--max-new-tokens", "8", "--json", "good", "sad"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tok = AutoTokenizer.from_pretrained(root / "base")
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    lk.load_adapter(model, out / "adapter")
    model.eval()
    for row, prompt in zip(rows, ("good", "sad")):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
        assert row == {"prompt": prompt, "completion": tok.decode(greedy(model, list(ids), tok.eos_token_id, 8),
                                                                  skip_special_tokens=True)}
    # --no-chat: the plain prompt, with one BOS
    assert main(["generate", "--adapter", str(out), "--no-chat", "--max-new-tokens", "5", "--prompt", "good"]) == 0
    plain = capsys.readouterr().out.rstrip("\n")  # the printed line; the completion may end in newlines itself
    assert plain == tok.decode(greedy(model, [tok.bos_token_id] + tok("good", add_special_tokens=False)["input_ids"],
                                      tok.eos_token_id, 5), skip_special_tokens=True).rstrip("\n")


def test_generate_sampling_options(chat_run, capsys):
    _, out = chat_run
    args = ["generate", "--adapter", str(out), "--max-new-tokens", "6", "--temperature", "0.8", "--top-k", "5",
            "--top-p", "0.9", "--seed", "3", "good"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0 and capsys.readouterr().out == first  # seeded
    assert main(["generate", "--adapter", str(out), "--top-k", "5", "good"]) == 1
    assert "give --temperature > 0" in capsys.readouterr().err


def test_prompt_ids_never_double_the_bos():
    tok = char_tokenizer()
    assert prompt_ids(tok, "ab") == [tok.bos_token_id] + tok("ab", add_special_tokens=False)["input_ids"]
    assert prompt_ids(tok, "<s>ab") == prompt_ids(tok, "ab")


# ---------------------------------------------------------------- built-in models: merge and export
def test_merge_and_export_tiny_llama(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lorakit.train.inference import load_trained

    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": w * 3}) + "\n" for w in WORDS))  # raw text: language modelling
    run = tmp_path / "run"
    assert main(["train", "--model", "tiny-llama", "--seed", "3", "--data", str(data), "--max-steps", "2", "--lr",
                 "5e-2", "--init-lora-weights", "gaussian", "--eval-split", "0", "--threads", "1", "--no-progress",
                 "--out", str(run)]) == 0
    model, tok, _ = load_trained(str(run), "causal-lm")
    x = torch.tensor([tok("good bad", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ref = model(input_ids=x).logits
    assert main(["merge", "--adapter", str(run), "--out", str(tmp_path / "m1")]) == 0  # the run's own base
    assert main(["export", "tiny-llama", "--seed", "3", "--out", str(tmp_path / "base")]) == 0
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(run / "adapter"),
                 "--out", str(tmp_path / "m2")]) == 0
    for d in ("m1", "m2"):
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / d).eval()
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=x).logits, ref, atol=1e-5, rtol=0)
        assert "lora" not in "".join(n for n, _ in merged.named_modules())


# ---------------------------------------------------------------- TensorBoard
def test_report_to_tensorboard_writes_readable_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": w, "completion": w[::-1]}) + "\n" for w in WORDS * 2))
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-llama", "--data", str(data), "--max-steps", "4", "--eval-every", "2",
                 "--batch-size", "4", "--eval-split", "0.25", "--threads", "1", "--no-progress",
                 "--report-to", "tensorboard", "--out", str(out)]) == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    history = json.loads((out / "history.json").read_text())
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([h["loss"] for h in history["train"]], rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/loss")] == [2, 4]
    assert [e.value for e in acc.Scalars("eval/loss")] == pytest.approx([h["eval_loss"] for h in history["eval"]],
                                                                        rel=1e-6)
    assert {"train/lr", "train/tokens_per_second", "eval/perplexity"} <= set(acc.Tags()["scalars"])


def test_report_to_unknown_or_missing_tracker(tmp_path, capsys, monkeypatch):
    assert main(["train", "--model", "tiny-llama", "--report-to", "neptune", "--out", str(tmp_path / "r")]) == 1
    assert "--report-to ['neptune'] unknown" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main(["train", "--model", "tiny-llama", "--report-to", "wandb", "--out", str(tmp_path / "r")]) == 1
    assert "lorakit[wandb]" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_wrong_classification_columns_name_the_mapping_flags(tmp_path, capsys):
    data = tmp_path / "c.csv"
    data.write_text("sentence,sentiment\n" + "".join(f"{w},{int(i < 4)}\n" for i, w in enumerate(WORDS)))
    assert main(["train", "--model", "tiny-llama", "--data", str(data), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "cannot tell what the columns ['sentence', 'sentiment'] hold" in err and "--text-column" in err

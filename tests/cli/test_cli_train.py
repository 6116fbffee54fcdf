"""``lorakit train / predict / generate`` end to end on tiny models and the real default job (reduced)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
from lorakit.cli import build_parser, main
from lorakit.cli.train import settings_from_args
from lorakit.models import tiny_llama
from runners import SRC

torch.set_num_threads(1)


def sft_args(llama_dir, sft_file, out, *extra):
    return ["train", "--model", llama_dir, "--data", sft_file, "--task", "causal-lm", "--modules-to-save", "lm_head",
            "--target-modules", "q_proj,v_proj,up_proj", "--r", "4", "--lr", "1e-2", "--batch-size", "8",
            "--eval-split", "0.2", "--threads", "1", "--no-progress", "--out", str(out), *extra]


def test_sft_run_lowers_completion_loss_and_writes_outputs(llama_dir, sft_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(sft_args(llama_dir, sft_file, out, "--max-steps", "30")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("method", "trainable_params", "total_params", "eval_loss", "perplexity", "train_seconds",
                "tokens_per_second", "peak_memory_mb"):
        assert key in metrics, key
    history = json.loads((out / "history.json").read_text())
    assert metrics["eval_loss"] < 0.6 * history["train"][0]["loss"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "checkpoints").is_dir()

    # generate: the CLI's greedy completion equals a hand-written greedy loop over the reloaded adapter
    capsys.readouterr()
    assert main(["generate", "--adapter", str(out), "--prompt", "abc=", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    model, tok = tiny_llama(hidden_size=32, num_layers=2, seed=0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    lk.load_adapter(model, str(out / "adapter"))
    model.eval()
    ids = [tok.bos_token_id] + tok("abc=", add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    assert printed == tok.decode(new, skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_signal_then_resume_equals_uninterrupted(llama_dir, sft_file, tmp_path, sig):
    """Ctrl-C, or SIGTERM (kill, a scheduler's preemption): the step in progress finishes, a checkpoint
    is saved, and ``--resume`` ends at the uninterrupted run's weights."""
    steps = ["--max-steps", "150", "--checkpoint-every", "1", "--batch-size", "4", "--lora-dropout", "0.1"]
    part = tmp_path / "part"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", *sft_args(llama_dir, sft_file, part, *steps)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    # old checkpoints are pruned (keep 2): wait for any checkpoint at step >= 3
    while not [p for p in part.glob("checkpoints/step-*") if int(p.name[5:]) >= 3] and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert ("interrupt:" if sig == signal.SIGINT else "terminate signal:") in out
    assert f"lorakit train --resume {part}" in err
    assert not (part / "adapter").exists()  # it really stopped early
    assert main(["train", "--resume", str(part), "--no-progress"]) == 0

    full = tmp_path / "full"
    assert main(sft_args(llama_dir, sft_file, full, *steps)) == 0
    a = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_default_job_reduced_and_predict(tmp_path, capsys):
    """The embedded default (real MiniLM, real VADER words), cut to 60 steps; the full job is in CI's README run."""
    out = tmp_path / "default"
    assert main(["train", "--max-steps", "60", "--batch-size", "32", "--lr", "2e-3", "--threads", "1", "--no-progress",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_accuracy"] >= 0.85, metrics
    # LoRA r=8 on every Linear (6 layers x (4 x 384x384 + 384x1536 + 1536x384) + the 384x384 pooler) + the 384x2
    # head, as PEFT counts
    assert metrics["trainable_params"] == 6 * (4 * 8 * 768 + 2 * 8 * 1920) + 8 * 768 + 770 == 338_690
    # the adapter names where its base comes from, not a path inside the installed package
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    capsys.readouterr()
    assert main(["predict", "--adapter", str(out), "--json", "wonderful", "horrible"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == ["positive", "negative"]
    assert all(0.5 < r["probability"] <= 1 for r in rows)


# ---------------------------------------------------------------- settings, refusals, errors
def parse(argv):
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_config_file_then_flags_override(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    if suffix == ".toml":
        path.write_text('lr = 0.005\nbatch-size = 4\ntarget_modules = "q_proj,v_proj"\nuse_dora = true\n')
    else:
        path.write_text("lr: 0.005\nbatch-size: 4\ntarget_modules: [q_proj, v_proj]\nuse_dora: true\n")
    s = settings_from_args(parse(["train", "--config", str(path), "--lr", "1e-4", "--no-use-dora"]))
    assert s == {"lr": 1e-4, "batch_size": 4, "target_modules": ["q_proj", "v_proj"], "use_dora": False}


def test_config_file_takes_hf_trl_names_and_suggests_for_typos(tmp_path):
    path = tmp_path / "hf.toml"
    path.write_text("learning_rate = 0.1\nnum_train_epochs = 2\nper_device_train_batch_size = 4\n"
                    "gradient_accumulation_steps = 2\nlora_r = 4\n")
    s = settings_from_args(parse(["train", "--config", str(path)]))
    assert s == {"lr": 0.1, "epochs": 2, "batch_size": 4, "grad_accum": 2, "r": 4}
    # the flags take the same names
    s = settings_from_args(parse(["train", "--learning-rate", "0.2", "--num-train-epochs", "3"]))
    assert s == {"lr": 0.2, "epochs": 3.0}
    path.write_text("learnig_rate = 0.1\n")
    with pytest.raises(ValueError, match=r"unknown setting 'learnig_rate'; did you mean 'lr'\?"):
        settings_from_args(parse(["train", "--config", str(path)]))
    path.write_text("lr = 0.1\nlearning_rate = 0.2\n")
    with pytest.raises(ValueError, match=r"'lr' is given twice"):
        settings_from_args(parse(["train", "--config", str(path)]))


def test_existing_out_dir_is_not_clobbered(llama_dir, sft_file, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(sft_args(llama_dir, sft_file, out, "--max-steps", "1")) == 1
    assert "already exists and is not empty" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]


def test_bad_data_fails_before_training(llama_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": ""}\n')
    out = tmp_path / "never"
    assert main(sft_args(llama_dir, str(data), out, "--max-steps", "1")) == 1
    assert "bad.jsonl:2: the completion '' is empty after tokenization" in capsys.readouterr().err
    assert not out.exists()


def test_resume_refuses_changed_settings(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--lr", "1"]) == 1
    assert "drop ['lr']" in capsys.readouterr().err


def test_help_explains_every_command(capsys):
    for cmd in ("train", "predict", "generate"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "--adapter" in capsys.readouterr().out or cmd == "train"


def test_bf16_and_gradient_checkpointing_flags(llama_dir, sft_file, tmp_path):
    out = tmp_path / "run"
    assert main(sft_args(llama_dir, sft_file, out, "--max-steps", "20", "--bf16", "--gradient-checkpointing")) == 0
    resolved = json.loads((out / "run_config.json").read_text())
    assert resolved["bf16"] is True and resolved["gradient_checkpointing"] is True
    metrics = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert metrics["eval_loss"] < history["train"][0]["loss"]

"""The CLI's manners (issue 17) and the train-job defects of issue 11 (#15, #17, #19, #25, #26),
on a tiny random LLaMA with a character tokenizer."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import warnings
from dataclasses import fields

import pytest
import torch

from lorakit.cli import build_parser, main
from lorakit.train.checkpoint import list_checkpoints
from lorakit.train.config import TrainConfig
from lorakit.train.settings import DEFAULTS, TRAIN_KEYS, parse_modules
from runners import SRC

ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{w}=", "completion": w[::-1]}) + "\n"
                            for w in ["ab", "abc", "ba", "cab", "bca", "aab", "cc", "acb"] * 3))
    return str(path)


def train_args(llama_dir, sft_file, out, *extra):
    return ["train", "--model", llama_dir, "--data", sft_file, "--r", "2", "--batch-size", "4", "--eval-split", "0.25",
            "--threads", "1", "--no-progress", "--out", str(out), *extra]


# ---------------------------------------------------------------- issue 11 defects
def test_resume_takes_new_device_and_threads(llama_dir, sft_file, tmp_path):
    """#15: --resume OUT --device X --threads N used the saved device and threads."""
    out = tmp_path / "run"
    assert main(train_args(llama_dir, sft_file, out, "--max-steps", "2", "--device", "cpu:0")) == 0
    assert json.loads((out / "metrics.json").read_text())["device"] == "cpu:0"
    assert main(["train", "--resume", str(out), "--device", "cpu", "--threads", "2", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["device"] == "cpu" and metrics["threads"] == 2


def test_one_dotted_target_module_is_a_suffix_not_a_regex(llama_dir, sft_file, tmp_path):
    """#17: --target-modules self_attn.q_proj matched nothing (read as a regex)."""
    assert parse_modules("self_attn.q_proj") == ["self_attn.q_proj"]
    assert parse_modules("q_proj,v_proj") == ["q_proj", "v_proj"]
    assert parse_modules(r".*\.(q|v)_proj") == r".*\.(q|v)_proj" and parse_modules("all-linear") == "all-linear"
    out = tmp_path / "run"
    assert main(train_args(llama_dir, sft_file, out, "--max-steps", "1", "--target-modules", "self_attn.q_proj")) == 0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["self_attn.q_proj"]
    from safetensors import safe_open

    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert sorted({k.split(".self_attn")[0] for k in f.keys()}) == [f"base_model.model.model.layers.{i}"
                                                                         for i in (0, 1)]


def test_overwrite_removes_the_old_runs_checkpoints(llama_dir, sft_file, tmp_path):
    """#19: --overwrite kept the old checkpoints; a later --resume silently continued the OLD run."""
    out = tmp_path / "run"
    assert main(train_args(llama_dir, sft_file, out, "--max-steps", "4", "--checkpoint-every", "1")) == 0
    assert [os.path.basename(c) for c in list_checkpoints(str(out))] == ["step-000003", "step-000004"]
    (out / "notes.txt").write_text("mine")  # not lorakit's: kept
    assert main(train_args(llama_dir, sft_file, out, "--max-steps", "2", "--overwrite")) == 0
    assert [os.path.basename(c) for c in list_checkpoints(str(out))] == ["step-000002"]
    assert (out / "notes.txt").read_text() == "mine"
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2


def test_ctrl_c_during_start_up_claims_no_checkpoint(llama_dir, sft_file, tmp_path, monkeypatch, capsys):
    """#25: Ctrl-C while loading printed "checkpoint saved; continue with --resume" though none existed."""
    import lorakit.train.job as job

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "load_base", interrupted)
    out = tmp_path / "run"
    assert main(train_args(llama_dir, sft_file, out, "--max-steps", "1")) == 130
    err = capsys.readouterr().err
    assert "checkpoint saved" not in err and "--resume" not in err
    assert "no checkpoint was written, nothing to resume" in err
    assert not out.exists()  # nothing was written before the interrupt


def test_missing_matplotlib_skips_the_plot_with_a_warning_before_training(llama_dir, sft_file, tmp_path, monkeypatch,
                                                                          capsys):
    """#26: without matplotlib the run trained to the end, then died on `import matplotlib`."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "run"
    assert main(train_args(llama_dir, sft_file, out, "--max-steps", "2")) == 0
    captured = capsys.readouterr()
    first = captured.err.splitlines()[0]
    assert "matplotlib is not installed, so curves.png will not be written" in first and "lorakit[train]" in first
    assert (out / "metrics.json").is_file() and (out / "adapter").is_dir() and not (out / "curves.png").exists()
    assert "curves.png" not in captured.out


def test_double_ctrl_c_exits_130_without_a_traceback(llama_dir, sft_file, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lorakit", *train_args(llama_dir, sft_file, out, "--max-steps", "100000")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "run_config.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    for _ in range(40):  # keep pressing through the checkpoint save and the interpreter's shutdown
        time.sleep(0.02)
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err


# ---------------------------------------------------------------- manners
def test_version(capsys):
    from lorakit import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"lorakit {__version__}\n"


def test_help_shows_each_default_once():
    parser = build_parser()
    subs = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices
    assert set(subs) >= {"train", "predict", "generate", "compare", "inspect", "merge", "bench", "export", "convert"}
    for name, sub in subs.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.help:
                text = formatter._expand_help(action)
                assert len(re.findall(r"\(default|default:", text)) <= 1, (name, action.option_strings, text)


def test_train_config_defaults_are_the_clis():
    train_defaults = {f.name: f.default for f in fields(TrainConfig)}
    for key in TRAIN_KEYS:
        if key != "progress":  # the CLI's None: a bar on a terminal, plain lines in a log
            assert DEFAULTS[key] == train_defaults[key], key


def test_every_training_setting_reaches_train_config():
    """A job setting that names a TrainConfig field must be passed to it (``--fsdp`` once was not, and
    trained with DDP without a word), and every train flag must land in a setting."""
    settings_only = {"loss_chunk_size"}  # TrainConfig fields the CLI does not expose
    assert {f.name for f in fields(TrainConfig)} - settings_only == set(TRAIN_KEYS)
    parser = build_parser()
    train = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices["train"]
    dests = {a.dest for a in train._actions if a.option_strings and a.dest not in ("help", "config", "resume")}
    assert dests <= set(DEFAULTS), dests - set(DEFAULTS)


def test_device_without_cuda_is_one_line_and_writes_nothing(llama_dir, sft_file, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this torch can use CUDA")
    out = tmp_path / "run"
    assert main(train_args(llama_dir, sft_file, out, "--device", "cuda")) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorakit train: error: --device cuda: this torch") and err.count("\n") == 1
    assert not out.exists()
    assert main(train_args(llama_dir, sft_file, out, "--device", "gpu0")) == 1
    assert "is not a device name" in capsys.readouterr().err


def test_rank_above_the_targets_width_is_refused(llama_dir, sft_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(llama_dir, sft_file, out, "--r", "1024")) == 1
    err = capsys.readouterr().err
    assert "--r 1024 is larger than model.layers.0.self_attn.q_proj allows: it maps 32 to 32 features" in err
    assert "use --r 32 or less" in err and not out.exists()


def test_outputs_are_readable_by_others_and_name_a_portable_base(sft_file, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-llama", "--data", sft_file, "--max-steps", "1", "--no-progress",
                 "--threads", "1", "--out", str(out)]) == 0
    mask = os.umask(0)
    os.umask(mask)
    for root, dirs, files in os.walk(out):
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) == 0o777 & ~mask, d
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) == 0o666 & ~mask, f
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny-llama"


def test_log_file_gets_lines_not_carriage_returns_and_eval_lines(llama_dir, sft_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = [a for a in train_args(llama_dir, sft_file, out, "--max-steps", "6", "--eval-every", "3")
            if a != "--no-progress"]
    assert main(args) == 0  # stderr is not a terminal here: plain lines, no bar
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "train step 6/6: loss=" in err
    assert [line.split(":")[0] for line in err.splitlines() if line.startswith("eval")] == ["eval  step 3/6",
                                                                                           "eval  step 6/6"]


def test_inspect_accepts_a_run_directory(llama_dir, sft_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(llama_dir, sft_file, out, "--max-steps", "1")) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["directory"] == str(out / "adapter") and info["lorakit_can_load"] is True


def test_broken_pipe_is_quiet(llama_dir, sft_file, tmp_path):
    """`lorakit inspect DIR | head`: the reader is gone before lorakit writes; no BrokenPipeError traceback."""
    out = tmp_path / "run"
    assert main(train_args(llama_dir, sft_file, out, "--max-steps", "1")) == 0
    r, w = os.pipe()
    os.close(r)  # the reader has already gone
    proc = subprocess.run([sys.executable, "-m", "lorakit", "inspect", str(out)], env=ENV, stdout=w,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(w)
    assert proc.stderr == "" and proc.returncode == 141


def test_merge_shows_no_transformers_progress_bars(llama_dir, sft_file, tmp_path, capfd):
    out = tmp_path / "run"
    assert main(train_args(llama_dir, sft_file, out, "--max-steps", "1")) == 0
    capfd.readouterr()
    assert main(["merge", "--base", llama_dir, "--adapter", str(out / "adapter"), "--out", str(tmp_path / "m")]) == 0
    captured = capfd.readouterr()
    assert captured.err == "", captured.err
    assert captured.out.startswith("merged ")
    mask = os.umask(0)
    os.umask(mask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()} == {0o666 & ~mask}


def test_bench_json_has_no_warning_above_it(monkeypatch, capsys):
    import lorakit.compare.vs_peft

    def fake_run(rounds, threads):  # what the real run does first: PEFT on a transformers model
        import peft
        import transformers as tf

        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, vocab_size=32))
        peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
        return {"ratios": {"x": 1.0}}

    monkeypatch.setattr(lorakit.compare.vs_peft, "run", fake_run)
    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["bench", "--rounds", "1"]) == 0
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    assert json.loads(capsys.readouterr().out) == {"ratios": {"x": 1.0}}


def test_import_lorakit_loads_no_application_dependency():
    code = ("import sys, lorakit; heavy = ('transformers', 'matplotlib', 'datasets', 'tensorboard', 'wandb', 'mlflow', "
            "'yaml', 'peft'); print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # (tqdm is imported by torch itself, through torch.hub)


def test_loading_a_model_logs_nothing_from_torchao(llama_dir):
    """transformers imports torchao when it is installed (the quant extra); torchao's import-time
    warnings (CUDA kernel libraries it cannot load, a torch pytree deprecation) stay off stderr."""
    pytest.importorskip("torchao")
    code = ("from lorakit.models import load_model; "
            f"load_model({str(llama_dir)!r}, task='causal-lm'); print('loaded')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "loaded"
    assert "Failed to load" not in proc.stderr and "register_constant" not in proc.stderr, proc.stderr

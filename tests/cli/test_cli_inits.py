"""``lorakit train --init``: each data-aware init runs on the training set, and the run's adapter,
reloaded onto the original base model, gives the run's own final evaluation."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit.cli import main

torch.set_num_threads(1)


def args(llama_dir, sft_file, out, *extra):
    return ["train", "--model", llama_dir, "--data", sft_file, "--task", "causal-lm", "--target-modules",
            "q_proj,v_proj,up_proj", "--r", "4", "--lr", "1e-2", "--batch-size", "8", "--eval-split", "0.2",
            "--threads", "1", "--no-progress", "--max-steps", "4", "--out", str(out), *extra]


def reloaded_eval_loss(out) -> float:
    """The run's eval split, evaluated with the saved adapter loaded onto a freshly loaded base."""
    from lorakit.models import load_model, load_tokenizer
    from lorakit.train import evaluate
    from lorakit.train.job_data import build_data
    from lorakit.train.settings import JobSettings

    job = JobSettings.from_run_config(json.loads((out / "run_config.json").read_text()))
    _, _, ev = build_data(job, load_tokenizer(job.model))
    model, _ = load_model(job.model, job.task, label_names=job.labels, seed=job.seed)
    lk.load_adapter(model, out / "adapter")
    return evaluate(model, ev)["eval_loss"]


@pytest.mark.parametrize("init, line", [("eva", "EVA ranks set"), ("corda", "CorDA covariances: 48 calibration"),
                                        ("lora-ga", "LoRA-GA gradients: 6 calibration"), ("loftq", None)])
def test_train_init_runs_and_its_adapter_reloads_onto_the_original_base(init, line, llama_dir, sft_file, tmp_path,
                                                                        capsys):
    if init == "loftq":
        pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    assert main(args(llama_dir, sft_file, out, "--init", init)) == 0
    err = capsys.readouterr().err
    if line:
        assert line in err
    metrics = json.loads((out / "metrics.json").read_text())
    written = json.loads((out / "adapter" / "adapter_config.json").read_text())
    if init in ("corda", "lora-ga"):  # converted for the original base
        assert written["init_lora_weights"] is True and written["r"] == 8
    else:
        assert written["init_lora_weights"] == init
    assert reloaded_eval_loss(out) == pytest.approx(metrics["eval_loss"], rel=1e-4)


def test_train_init_that_writes_into_a_quantized_base_is_refused_before_writing(llama_dir, sft_file, tmp_path,
                                                                                  capsys):
    out = tmp_path / "run"
    assert main(args(llama_dir, sft_file, out, "--init", "loftq", "--quantize", "nf4")) == 1
    assert "--init loftq writes into the base weights" in capsys.readouterr().err
    assert not out.exists()
    assert main(args(llama_dir, sft_file, out, "--init", "eva", "--init-lora-weights", "pissa")) == 1
    assert "disagree" in capsys.readouterr().err
    assert not out.exists()

"""Settings files with transformers' TrainingArguments / TRL names: the ones that mean something in lorakit
are honoured — each pinned to what transformers or TRL does with it — and the others are refused with the
reason; and ``lorakit train`` says what it will do before the first step."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from lorakit.cli import build_parser, main
from lorakit.cli.train import settings_from_args


def settings_of(tmp_path, text: str) -> dict:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return settings_from_args(build_parser().parse_args(["train", "--config", str(path)]))


def test_trainingarguments_and_trl_names_are_read(tmp_path):
    s = settings_of(tmp_path, """
logging_steps: 5
optim: paged_adamw_8bit
adam_beta2: 0.95
lr_scheduler_type: cosine_with_restarts
lr_scheduler_kwargs: {num_cycles: 2}
eval_strategy: steps
eval_steps: 10
save_strategy: epoch
gradient_checkpointing: true
gradient_checkpointing_kwargs: {use_reentrant: true}
neftune_noise_alpha: 5.0
completion_only_loss: false
assistant_only_loss: true
task_type: CAUSAL_LM
logging_strategy: steps
overwrite_output_dir: true
""")
    assert s == {"log_every": 5, "optim": "paged_adamw_8bit", "adam_beta2": 0.95, "schedule": "cosine_with_restarts",
                 "schedule_kwargs": {"num_cycles": 2}, "eval_strategy": "steps", "eval_every": 10,
                 "save_strategy": "epoch", "gradient_checkpointing": True,
                 "gradient_checkpointing_kwargs": {"use_reentrant": True}, "neftune_noise_alpha": 5.0,
                 "completion_only_loss": False, "assistant_only_loss": True, "task": "causal-lm", "overwrite": True}
    from lorakit.train.settings import JobSettings

    job = JobSettings.from_settings(s)
    cfg = job.train_config(progress=False)  # every one reaches the loop's config, checked
    assert (cfg.log_every, cfg.optim, cfg.schedule, cfg.neftune_noise_alpha) == (5, "paged_adamw_8bit",
                                                                                 "cosine_with_restarts", 5.0)


@pytest.mark.parametrize("text, reason", [
    ("fp16: true", "fp16 autocast needs a loss scaler"),
    ("push_to_hub: true", "lorakit does not upload"),
    ("load_best_model_at_end: true", "does not track a best checkpoint"),
    ("dataloader_num_workers: 4", "there is no DataLoader"),
    ("deepspeed: ds.json", "torchrun"),
    ("task_type: TOKEN_CLS", "task_type 'TOKEN_CLS' is not one lorakit train trains"),
    ("optim: galore_adamw", "projects or fuses gradients"),
    ("lr_scheduler_type: reduce_lr_on_plateau", "steps on an eval metric"),
    ("logging_strategy: epoch", "lorakit logs every log_every"),
])
def test_names_lorakit_does_not_honour_are_refused_with_the_reason(tmp_path, text, reason):
    from lorakit.train.settings import JobSettings

    with pytest.raises(ValueError, match=reason) as e:
        JobSettings.from_settings(settings_of(tmp_path, text)).train_config(False)
    assert "did you mean" not in str(e.value)


def test_a_typo_gets_a_close_name_and_logging_steps_no_misleading_one(tmp_path):
    with pytest.raises(ValueError, match=r"unknown setting 'num_train_epoch'; did you mean 'epochs'\?"):
        settings_of(tmp_path, "num_train_epoch: 2")
    with pytest.raises(ValueError) as e:
        settings_of(tmp_path, "logging_stepz: 2")
    assert "eval_every" not in str(e.value).split("Valid settings")[0]


@pytest.mark.parametrize("kind, kwargs", [
    ("cosine", {}), ("linear", {}), ("constant_with_warmup", {}), ("cosine_with_restarts", {"num_cycles": 3}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}), ("polynomial", {"power": 2.0, "lr_end": 1e-4}),
    ("inverse_sqrt", {}),
])
def test_schedules_are_transformers_after_warmup(kind, kwargs):
    from transformers import get_scheduler

    from lorakit.train.schedule import make_scheduler

    total, warmup, lr = 40, 5, 1e-3

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        sched = make(opt)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: make_scheduler(o, total, warmup, kind, kwargs, lr))
    theirs = lrs(lambda o: get_scheduler(kind, o, num_warmup_steps=warmup, num_training_steps=total,
                                         scheduler_specific_kwargs=kwargs))
    assert ours[warmup:] == pytest.approx(theirs[warmup:], rel=1e-12, abs=1e-15)
    assert all(0 < x <= lr for x in ours[:warmup])  # lorakit's warm-up starts above 0 (transformers' at 0)


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "adamw_8bit",
                                  "paged_adamw_8bit", "paged_adamw_32bit", "sgd", "adafactor"])
def test_optimizers_are_the_ones_transformers_builds(name):
    if "bnb" in name or "8bit" in name or "paged" in name:
        pytest.importorskip("bitsandbytes")
    from transformers import Trainer, TrainingArguments

    from lorakit.train.optim import optimizer_cls_and_kwargs

    args = TrainingArguments(output_dir="unused", optim=name, learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95,
                             adam_epsilon=1e-6, use_cpu=True, report_to=[])
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    ours = optimizer_cls_and_kwargs(name, 3e-4, (0.8, 0.95), 1e-6, torch.device("cpu"))
    assert ours == (cls, kwargs)


def test_neftune_noise_is_transformers_and_only_in_training():
    from transformers.integrations.neftune import neftune_post_forward_hook

    from lorakit.models import tiny_llama
    from lorakit.train.neftune import neftune

    model, _ = tiny_llama(hidden_size=32, num_layers=1)
    embed = model.get_input_embeddings()
    ids = torch.randint(4, 90, (2, 7))
    clean = embed(ids)
    embed.neftune_noise_alpha = 5.0
    with neftune(model, 5.0):
        model.train()
        torch.manual_seed(3)
        noisy = embed(ids)
        model.eval()
        assert torch.equal(embed(ids), clean)  # evaluation and generation see clean embeddings
    torch.manual_seed(3)
    ref = neftune_post_forward_hook(embed.train(), None, clean)
    assert torch.equal(noisy, ref) and not torch.equal(noisy, clean)
    assert torch.equal(embed(ids), clean)  # the hook is gone after the block


@pytest.fixture(scope="module")
def prompt_completion(tmp_path_factory):
    path = tmp_path_factory.mktemp("pc") / "pc.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{w}=", "completion": w[::-1]}) + "\n"
                            for w in ["ab", "abc", "cab", "bca", "aab", "cc", "bb", "abcd", "dcb", "ad"]))
    return str(path)


def test_completion_only_loss_false_puts_the_loss_on_every_token(prompt_completion):
    from lorakit.models import char_tokenizer
    from lorakit.train.job import build_data
    from lorakit.train.settings import JobSettings

    tok = char_tokenizer()
    job = JobSettings.from_settings({"data": prompt_completion, "eval_split": 0})
    _, default, _ = build_data(job, tok)
    assert all(-100 in e["labels"] for e in default.examples)  # lorakit's (and TRL's) default: completion only
    _, whole, _ = build_data(dataclasses.replace(job, completion_only_loss=False), tok)
    assert all(e["labels"] == e["input_ids"] for e in whole.examples)  # TRL: labels = input_ids
    with pytest.raises(ValueError, match="assistant_only_loss applies to chat data"):
        build_data(dataclasses.replace(job, assistant_only_loss=False), tok)


def test_strategies_and_logging_interval_shape_the_run(prompt_completion, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-llama", "--data", prompt_completion, "--batch-size", "4", "--epochs", "2",
                 "--save-strategy", "epoch", "--keep-checkpoints", "5", "--eval-strategy", "no", "--logging-steps", "2",
                 "--optim", "adamw_torch_fused", "--schedule", "cosine_with_restarts", "--neftune-noise-alpha", "5",
                 "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    # 10 examples, batch 4: 3 steps per epoch, 6 in all; a checkpoint per epoch, no evaluation, loss every 2 steps
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000003", "step-000006"]
    history = json.loads((out / "history.json").read_text())
    assert history["eval"] == [] and [h["step"] for h in history["train"]] == [2, 4, 6]
    assert "eval_loss" not in json.loads((out / "metrics.json").read_text())


def test_train_says_what_it_will_do_before_the_first_step(prompt_completion, tmp_path, capsys):
    import lorakit as lk
    from lorakit.models import tiny_llama

    assert main(["train", "--model", "tiny-llama", "--data", prompt_completion, "--batch-size", "2", "--grad-accum",
                 "2", "--max-steps", "1", "--threads", "1", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    before = err.split("run directory")[0]
    model, _ = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    trainable, total = lk.trainable_parameters(model)
    assert ("on 14 modules (down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj): the default, all-linear "
            "('LoRA without regret'") in before
    assert f"trainable parameters: {trainable:,} of {total:,}" in before
    assert "data: 9 training examples, 1 eval examples (10% of --data held out" in before
    assert "effective batch 4 = 2 per step × 2 accumulation; optimizer steps: 1 (--max-steps)" in before


def test_reentrant_gradient_checkpointing_still_trains_the_adapters(prompt_completion, tmp_path):
    """gradient_checkpointing_kwargs={"use_reentrant": True} reaches the loop: the adapters get gradients
    through reentrant blocks (the input embeddings' output requires grad) and the run ends where the
    non-reentrant one does."""
    from safetensors.torch import load_file

    from lorakit.train.job import run_job

    adapters = []
    for reentrant in (True, False):
        out = tmp_path / f"re-{reentrant}"
        run_job({"model": "tiny-llama", "data": prompt_completion, "max_steps": 2, "lr": 1e-2, "eval_split": 0,
                 "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": reentrant},
                 "threads": 1, "progress": False, "out": str(out)})
        adapters.append(load_file(out / "adapter" / "adapter_model.safetensors"))
    assert any(t.abs().max() > 0 for k, t in adapters[0].items() if "lora_B" in k)  # B moved off zero: it trained
    assert all(torch.allclose(adapters[0][k], adapters[1][k], atol=1e-6) for k in adapters[0])

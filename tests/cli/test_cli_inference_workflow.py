"""generate / predict as a PEFT/TRL user expects them: replies end where training ended them, prompts are
formatted as in training, data files are read with train's readers, plain PEFT adapter directories load
with --base, a built-in name means the built-in model everywhere."""

from __future__ import annotations

import json
import os

import pytest
import torch

import lorakit as lk
from lorakit.cli import main
from lorakit.models import tiny_llama

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
WORDS = ["good", "great", "fine", "nice", "bad", "awful", "sad", "poor"]


def always_emits(model, token: int) -> None:
    """Make ``model`` predict ``token`` at every position (its logits replaced by a one-hot)."""
    def hook(module, args, out):
        onehot = torch.zeros_like(out)
        onehot[..., token] = 10.0
        return onehot

    model.lm_head.register_forward_hook(hook)


def count_new_tokens(model) -> list[int]:
    """Wrap ``model.generate`` to record how many tokens each call generated."""
    counts: list[int] = []
    original = model.generate

    def generate(**kw):
        out = original(**kw)
        counts.append(out.shape[1] - kw["input_ids"].shape[1])
        return out

    model.generate = generate
    return counts


def test_generation_stops_at_the_generation_configs_terminators():
    from lorakit.train.inference import generate

    model, tok = tiny_llama(hidden_size=32, num_layers=1)
    stop = tok.convert_tokens_to_ids("x")
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]  # e.g. Qwen's [<|im_end|>, <|endoftext|>]
    always_emits(model, stop)
    x = torch.tensor([[tok.bos_token_id, *tok("ab", add_special_tokens=False)["input_ids"]]])
    reference = model.generate(input_ids=x, max_new_tokens=16, do_sample=False)  # plain HF generate
    counts = count_new_tokens(model)
    completion = generate(model, tok, "ab", max_new_tokens=16)
    assert counts == [reference.shape[1] - x.shape[1]] == [1]
    assert completion == ""  # the terminator ends the reply and is not part of it


def test_chat_generation_stops_at_the_templates_end_of_turn():
    from lorakit.train.inference import generate

    model, tok = tiny_llama(hidden_size=32, num_layers=1)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    model.resize_token_embeddings(len(tok))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == tok.eos_token_id != im_end  # the config knows only </s>
    always_emits(model, im_end)
    counts = count_new_tokens(model)
    assert generate(model, tok, messages=[{"role": "user", "content": "hi"}], max_new_tokens=16) == ""
    assert counts == [1]  # training put the loss on "...<|im_end|>": the reply ends there
    from lorakit.train.prompts import end_of_turn_id

    assert end_of_turn_id(tok) == im_end


@pytest.fixture(scope="module")
def alpaca_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("alpaca")
    data = root / "alpaca.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Reverse {w}", "input": "" if i % 2 else w, "output": w[::-1]})
                            + "\n" for i, w in enumerate(WORDS)))
    out = root / "run"
    assert main(["train", "--model", "tiny-llama", "--data", str(data), "--max-steps", "1", "--eval-split", "0",
                 "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    return root, out


def trained_prompt(record: dict) -> list[int]:
    """The prompt tokens training fed for ``record`` (everything before the first loss-carrying token)."""
    from lorakit.data.tokenize import sft_dataset
    from lorakit.models import char_tokenizer

    ex = sft_dataset([{**record, "output": "z", "_line": 1}], char_tokenizer(), "x.jsonl").examples[0]
    first = next(i for i, label in enumerate(ex["labels"]) if label != -100)
    return ex["input_ids"][:first]


def fed_prompts(monkeypatch) -> list[list[int]]:
    """Record the input ids of every ``generate`` call of the CLI."""
    from transformers import GenerationMixin

    seen: list[list[int]] = []
    original = GenerationMixin.generate

    def spy(self, *args, **kw):
        seen.append(kw["input_ids"][0].tolist())
        return original(self, *args, **kw)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    return seen


def test_alpaca_runs_get_their_template_at_generation_time(alpaca_run, monkeypatch, capsys):
    _, out = alpaca_run
    seen = fed_prompts(monkeypatch)
    assert main(["generate", "--adapter", str(out), "--max-new-tokens", "2", "Reverse sad"]) == 0
    assert main(["generate", "--adapter", str(out), "--max-new-tokens", "2", "Reverse sad", "--input", "sad"]) == 0
    assert seen == [trained_prompt({"instruction": "Reverse sad"}),
                    trained_prompt({"instruction": "Reverse sad", "input": "sad"})]
    assert main(["generate", "--adapter", str(out), "--max-new-tokens", "2", "--no-template", "Reverse sad"]) == 0
    assert len(seen[2]) == 1 + len("Reverse sad")  # [bos] + the bare text, as asked


def test_a_prompts_file_takes_multi_line_prompts_in_the_training_layouts(alpaca_run, monkeypatch, capsys, tmp_path):
    _, out = alpaca_run
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"instruction": "Reverse\nthese two lines", "input": "ab\ncd"}, {"instruction": "Reverse ok"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = fed_prompts(monkeypatch)
    capsys.readouterr()
    assert main(["generate", "--adapter", str(out), "--max-new-tokens", "2", "--json", "--prompts-file",
                 str(prompts)]) == 0
    assert seen == [trained_prompt(r) for r in rows]
    assert [json.loads(line)["prompt"] for line in capsys.readouterr().out.splitlines()] == \
        ["Reverse\nthese two lines", "Reverse ok"]


@pytest.fixture(scope="module")
def cls_base(tmp_path_factory):
    """A tiny random BERT classifier (3 labels) with the character tokenizer, saved as a directory."""
    from transformers import BertConfig, BertForSequenceClassification

    from lorakit.models import char_tokenizer

    root = tmp_path_factory.mktemp("cls")
    tok = char_tokenizer()
    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     vocab_size=len(tok), max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                     id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    return root / "bert"


def test_predict_reads_a_data_file_with_trains_readers_and_scores_it(cls_base, tmp_path, capsys):
    data = tmp_path / "train.csv"
    data.write_text("sentence,sentiment\n" + "".join(f"{w},{'pos' if i < 4 else 'neg'}\n" for i, w in enumerate(WORDS)))
    run = tmp_path / "run"
    assert main(["train", "--model", str(cls_base), "--data", str(data), "--text-column", "sentence", "--label-column",
                 "sentiment", "--labels", "neg,neu,pos", "--max-steps", "2", "--eval-split", "0", "--threads", "1",
                 "--no-progress", "--out", str(run)]) == 0
    test = tmp_path / "test.csv"
    test.write_text('sentence,sentiment\n"good, really",pos\nawful,neg\n"multi\nline",pos\n')
    capsys.readouterr()
    assert main(["predict", "--adapter", str(run), "--input", str(test), "--json", "--eval"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["text"] for r in rows] == ["good, really", "awful", "multi\nline"]  # no header, no gold label
    gold = ["pos", "neg", "pos"]
    right = sum(r["label"] == g for r, g in zip(rows, gold))
    assert f"accuracy: {right / 3:.4f} ({right} of 3)" in captured.err
    matrix = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in captured.err.splitlines()[2:]}
    labels = ["neg", "neu", "pos"]  # the run's label set, in its order
    assert matrix == {g: [sum(1 for r, gg in zip(rows, gold) if gg == g and r["label"] == p) for p in labels]
                      for g in labels}
    assert main(["predict", "--adapter", str(run), "--input", str(test), "--text-column", "nope"]) == 1
    assert "nope" in capsys.readouterr().err


def test_generate_and_predict_take_a_peft_adapter_directory_with_base(cls_base, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BertForSequenceClassification

    from lorakit.train.inference import load_trained

    # a causal-LM adapter written by PEFT for a local base directory
    model, tok = tiny_llama(hidden_size=32, num_layers=1, seed=2)
    model.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "llama"),
                        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft-lm")
    capsys.readouterr()
    assert main(["generate", "--adapter", str(tmp_path / "peft-lm"), "--base", str(tmp_path / "llama"),
                 "--max-new-tokens", "4", "--json", "ab"]) == 0
    got = json.loads(capsys.readouterr().out)["completion"]
    x = torch.tensor([[tok.bos_token_id, *tok("ab", add_special_tokens=False)["input_ids"]]])
    with torch.no_grad():
        ref = pm.eval().generate(input_ids=x, max_new_tokens=4, do_sample=False, eos_token_id=tok.eos_token_id)
    assert got == AutoTokenizer.from_pretrained(tmp_path / "llama").decode(ref[0, x.shape[1]:],
                                                                           skip_special_tokens=True)
    # a classification adapter (PEFT's SEQ_CLS recipe, head saved): labels from the base's config
    pc = get_peft_model(BertForSequenceClassification.from_pretrained(cls_base),
                        LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS",
                                   init_lora_weights=False))
    pc.save_pretrained(tmp_path / "peft-cls")
    assert main(["predict", "--adapter", str(tmp_path / "peft-cls"), "--base", str(cls_base), "--json", "good"]) == 0
    row = json.loads(capsys.readouterr().out)
    ids = AutoTokenizer.from_pretrained(cls_base)("good", return_tensors="pt")
    with torch.no_grad():
        p = pc.eval()(**ids).logits.softmax(-1)[0]
    assert row["label"] == ["neg", "neu", "pos"][int(p.argmax())]
    assert row["probability"] == pytest.approx(float(p.max()), abs=1e-5)
    # without --base the adapter's base_model_name_or_path is used; a wrong task is named
    model, _, trained = load_trained(str(tmp_path / "peft-cls"), "seq-cls")
    assert trained.job is None and trained.base.labels == ["neg", "neu", "pos"]
    assert main(["generate", "--adapter", str(tmp_path / "peft-cls"), "hi"]) == 1
    assert "task_type 'SEQ_CLS'; use lorakit predict" in capsys.readouterr().err


def test_a_builtin_name_means_the_builtin_model_everywhere_and_says_so(tmp_path, monkeypatch, capsys):
    from lorakit.models import export

    monkeypatch.chdir(tmp_path)
    export("tiny-llama", "tiny-llama", seed=5)  # ./tiny-llama: another model under the built-in's name
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": w * 2}) + "\n" for w in WORDS))
    assert main(["train", "--model", "tiny-llama", "--data", str(data), "--max-steps", "1", "--eval-split", "0",
                 "--threads", "1", "--no-progress", "--out", "run"]) == 0
    err = capsys.readouterr().err
    assert "'tiny-llama' is lorakit's built-in model and is used as such" in err
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["model"] == "tiny-llama"
    adapter_cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "tiny-llama"
    # merge takes the same model: the merged weights are the built-in (seed 0) base + ΔW
    assert main(["merge", "--adapter", "run", "--out", "merged"]) == 0
    assert "is used as such" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base, _ = tiny_llama(seed=0)
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)


@pytest.mark.slow
def test_inference_on_a_quantized_run_uses_the_quantized_base(tmp_path):
    """predict/generate load a --quantize run's base quantized, as training did: the reloaded model's eval
    loss is the one training measured (an unquantized base is several percent off)."""
    pytest.importorskip("bitsandbytes")
    from lorakit.data import load_dataset
    from lorakit.train.inference import load_trained
    from lorakit.train.measure import evaluate

    from models import write_reverse_sft

    data, ev = write_reverse_sft(tmp_path / "sft.jsonl", 24), write_reverse_sft(tmp_path / "ev.jsonl", 8)
    run = tmp_path / "run"
    assert main(["train", "--model", "tiny-llama", "--quantize", "nf4", "--data", data, "--eval-data", ev,
                 "--max-steps", "2", "--lr", "1e-2", "--threads", "1", "--no-progress", "--out", str(run)]) == 0
    trained_loss = json.loads((run / "metrics.json").read_text())["eval_loss"]
    model, tok, trained = load_trained(str(run), "causal-lm")
    ds = load_dataset(ev, tok, "causal-lm", max_length=512)
    assert evaluate(model, ds, 64, torch.device("cpu"))["eval_loss"] == pytest.approx(trained_loss, rel=1e-6)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert trained.base.quantize == "nf4"
    from lorakit.models import load_model

    unquantized, _ = load_model("tiny-llama", "causal-lm")  # what predict/generate loaded before
    lk.load_adapter(unquantized, os.path.join(run, "adapter"))
    x = torch.tensor([ds[0]["input_ids"]])
    with torch.no_grad():
        q, f = model(input_ids=x).logits.float(), unquantized.eval()(input_ids=x).logits
    assert (q - f).norm() / f.norm() > 0.01  # the two bases are different functions

"""``lorakit generate``: complete prompts, or answer chats, with a trained causal-LM adapter."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="complete prompts with a causal-LM adapter (a lorakit train run or a PEFT adapter)",
        description="Load the base model of a causal-LM adapter as it was trained (quantized for a --quantize run) "
                    "plus the adapter, and print the completion of each prompt (--prompt, arguments, lines on "
                    "standard input, or the records of --prompts-file). Prompts are formatted as the run was "
                    "trained: a run trained on Alpaca data wraps each prompt (the instruction; --input for the "
                    "input field) in Alpaca's template; --chat sends each as a user turn through the tokenizer's "
                    "chat template (apply_chat_template with the generation prompt), the default for runs trained "
                    "on 'messages'. A reply ends at the model's generation-config end tokens, the tokenizer's EOS "
                    "or the chat template's end-of-turn token. Greedy by default; --temperature > 0 samples, with "
                    "--top-p / --top-k. --adapter also takes any PEFT-format adapter directory, with --base for its "
                    "base model when the adapter does not name one.",
        epilog='examples:\n  lorakit generate --adapter runs/sft --prompt "Reverse: abc ->"\n'
               '  lorakit generate --adapter runs/alpaca "Translate to French" --input "good morning"\n'
               '  lorakit generate --adapter runs/chat --chat --system "Be brief." "hi" "what is LoRA?" --json\n'
               '  lorakit generate --adapter peft-adapter/ --base ./llama --prompts-file prompts.jsonl',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, metavar="DIR",
                   help="a lorakit train run (--out) or its adapter/ folder, or a PEFT-format adapter directory")
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="the base model: a directory, a built-in name or a Hub id (default: the run's, else the "
                        "adapter's base_model_name_or_path)")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts to complete")
    p.add_argument("--prompt", action="append", default=[], help="a prompt to complete (repeatable)")
    p.add_argument("--prompts-file", metavar="FILE",
                   help="prompts from a data file read as lorakit train reads data (.jsonl, .json, .csv, .tsv, "
                        ".parquet...): per record 'messages', 'instruction' [+ 'input'], the prompt column or the "
                        "text column (multi-line prompts, whole chats); a .txt file: one prompt per line")
    p.add_argument("--input", default=None, metavar="TEXT",
                   help="Alpaca runs: the 'input' field of each prompt (the prompt is the instruction)")
    p.add_argument("--template", action=argparse.BooleanOptionalAction, default=True,
                   help="format prompts with the run's own template (Alpaca runs); --no-template sends them as "
                        "they are")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="each prompt is a user message, rendered with the chat template (default: on for runs "
                        "trained on chats)")
    p.add_argument("--system", default=None, help="with --chat: a system message before each prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling temperature (default: 0)")
    p.add_argument("--top-p", type=float, default=None, help="sampling: nucleus probability mass (default: off)")
    p.add_argument("--top-k", type=int, default=None, help="sampling: keep the k most likely tokens (default: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda ... (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print JSON lines {prompt, completion}")
    return p


def _items(args: argparse.Namespace, job, chat: bool) -> list:
    """What to complete, formatted as the run was trained."""
    from lorakit.data.formats import Columns
    from lorakit.train.prompts import PromptItem, format_prompt, read_prompt_records

    texts = [*args.prompt, *args.prompts]
    if args.prompts_file and not args.prompts_file.lower().endswith(".txt"):
        columns = Columns.from_settings(job.to_dict()) if job is not None else Columns()
        items = read_prompt_records(args.prompts_file, columns, template=args.template, system=args.system)
    else:
        if args.prompts_file:
            with open(args.prompts_file, encoding="utf-8") as f:
                texts += [line.rstrip("\r\n") for line in f if line.strip()]
        elif not texts and not sys.stdin.isatty():
            texts = [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
        layout = job.layout if job is not None else None
        items = []
        for text in texts:
            if chat:
                system = [{"role": "system", "content": args.system}] if args.system is not None else []
                items.append(PromptItem(text, messages=[*system, {"role": "user", "content": text}]))
            else:
                items.append(PromptItem(text, prompt=format_prompt(text, layout, input_text=args.input,
                                                                   template=args.template)))
    if not items:
        raise ValueError("no prompt: give --prompt TEXT, PROMPT arguments, --prompts-file FILE or lines on stdin")
    return items


def run(args: argparse.Namespace) -> int:
    from lorakit.train.inference import generate, load_trained, resolve_trained

    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    job = resolve_trained(args.adapter, "causal-lm", args.base).job  # cheap: checks before loading the model
    chat = args.chat if args.chat is not None else (job is not None and job.layout == "chat")
    if args.system is not None and not chat and not args.prompts_file:
        raise ValueError("--system needs --chat")
    if args.input is not None and chat:
        raise ValueError("--input is the 'input' field of Alpaca prompts; with --chat, put it in the prompt")
    items = _items(args, job, chat)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tok, _ = load_trained(args.adapter, "causal-lm", args.device, base=args.base)
    kw = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed,
          "top_p": args.top_p, "top_k": args.top_k}
    for i, item in enumerate(items):
        if item.messages is not None:
            completion = generate(model, tok, messages=item.messages, **kw)
        else:
            completion = generate(model, tok, item.prompt, **kw)
        if args.json:
            print(json.dumps({"prompt": item.shown, "completion": completion}, ensure_ascii=False), flush=True)
        else:
            print(("" if i == 0 else "---\n") + completion, flush=True)
    return 0

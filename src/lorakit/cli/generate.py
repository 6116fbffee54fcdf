"""``lorakit generate``: complete prompts, or answer chats, with a trained causal-LM run."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="complete prompts with an adapter from lorakit train (causal-lm)",
        description="Load the base model of a causal-LM run plus its adapter and print the completion of each "
                    "prompt (given with --prompt, as arguments, or one per line on standard input). --chat sends "
                    "each prompt as a user turn through the tokenizer's chat template (apply_chat_template with the "
                    "generation prompt), as a chat-trained run expects; it is the default for runs trained on "
                    "'messages' data. Greedy by default; --temperature > 0 samples, with --top-p / --top-k.",
        epilog='examples:\n  lorakit generate --adapter runs/sft --prompt "Reverse: abc ->"\n'
               '  lorakit generate --adapter runs/chat --chat --system "Be brief." "hi" "what is LoRA?" --json',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, metavar="OUT",
                   help="the --out directory of a lorakit train run (or its adapter/ folder)")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts to complete")
    p.add_argument("--prompt", action="append", default=[], help="a prompt to complete (repeatable)")
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


def run(args: argparse.Namespace) -> int:
    from lorakit.train.inference import generate, load_trained

    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    prompts = [*args.prompt, *args.prompts]
    if not prompts and not sys.stdin.isatty():
        prompts = [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT, PROMPT arguments or lines on stdin")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tok, settings = load_trained(args.adapter, "causal-lm", args.device)
    chat = args.chat if args.chat is not None else settings.get("layout") == "chat"
    if args.system is not None and not chat:
        raise ValueError("--system needs --chat")
    for i, prompt in enumerate(prompts):
        kw = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed,
              "top_p": args.top_p, "top_k": args.top_k}
        if chat:
            messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
                [{"role": "user", "content": prompt}]
            completion = generate(model, tok, messages=messages, **kw)
        else:
            completion = generate(model, tok, prompt, **kw)
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False), flush=True)
        else:
            print(("" if i == 0 else "---\n") + completion, flush=True)
    return 0

"""``lorakit generate``: complete a prompt with a trained causal-LM run."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="complete a prompt with an adapter from lorakit train (causal-lm)",
        description="Load the base model of a causal-LM run plus its adapter and print the completion of "
                    "--prompt (greedy by default; --temperature > 0 samples).",
        epilog='example: lorakit generate --adapter runs/20250101-120000 --prompt "Reverse: abc ->"')
    p.add_argument("--adapter", required=True, metavar="OUT",
                   help="the --out directory of a lorakit train run (or its adapter/ folder)")
    p.add_argument("--prompt", required=True, help="the text to complete")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling temperature (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda ... (default: cpu)")
    return p


def run(args: argparse.Namespace) -> int:
    from lorakit.train.inference import generate, load_trained

    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    model, tok, _ = load_trained(args.adapter, "causal-lm", args.device)
    print(generate(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.seed))
    return 0

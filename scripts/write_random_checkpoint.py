"""A Hugging Face model directory with random bf16 weights shaped like a known model (`ringlet.models.shapes`) and
the embedded model's tokenizer and chat template (its ids all fall inside the larger vocabulary), for serving
benchmarks on machines that cannot download real weights: `ringlet node --model DIR`.

The output layer's rows past the tokenizer's vocabulary are zero: their logits are 0 while the largest of the
others is well above, so greedy decoding picks only ids the tokenizer can write, and every token reaches a
streaming client as text (a client counting chunks counts tokens). The bytes read per token are unchanged.

Usage: python scripts/write_random_checkpoint.py llama-3.1-8b DIR [--device cuda] [--tokenizer TOKDIR]

`--tokenizer TOKDIR` takes tokenizer.json and tokenizer_config.json from TOKDIR instead (a machine without the
embedded model's package: write them once where it is installed, with `--tokenizer-only TOKDIR`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as BackendTokenizer

from ringlet.models.loader import load_stage
from ringlet.models.random_checkpoint import random_weights, shape_config
from ringlet.models.registry import model_args
from ringlet.models.shapes import SHAPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES), nargs="?")
    parser.add_argument("directory", type=Path, nargs="?")
    parser.add_argument("--device", default="cpu", help="where the random values are drawn (cuda is faster)")
    parser.add_argument("--tokenizer", type=Path, help="copy the tokenizer files from this directory")
    parser.add_argument("--tokenizer-only", type=Path, metavar="TOKDIR",
                        help="write only the embedded model's tokenizer files, into TOKDIR, and stop")
    args = parser.parse_args()
    if args.tokenizer_only is not None:
        write_tokenizer(args.tokenizer_only)
        print(f"{args.tokenizer_only}: the embedded model's tokenizer files")
        return
    if args.shape is None or args.directory is None:
        parser.error("give a shape and a directory (or --tokenizer-only TOKDIR)")
    config = shape_config(args.shape) | {"torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    args.directory.mkdir(parents=True, exist_ok=True)
    weights = random_weights(model_args(config), torch.bfloat16, args.device)
    tokenizer_dir = args.tokenizer if args.tokenizer is not None else args.directory
    if args.tokenizer is None:
        write_tokenizer(args.directory)
    written = BackendTokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    # a tied model's output layer is its embedding, whose rows past the tokenizer are never looked up
    weights["lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"][written:] = 0
    save_file({name: tensor.cpu().contiguous() for name, tensor in weights.items()},
              str(args.directory / "model.safetensors"))
    (args.directory / "config.json").write_text(json.dumps(config, indent=2))
    if args.tokenizer is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(args.tokenizer / name, args.directory / name)
    print(f"{args.directory}: random {args.shape}, {sum(t.numel() for t in weights.values()) / 1e9:.2f}B parameters")


def write_tokenizer(directory: Path) -> None:
    """The embedded model's tokenizer and chat template, as a Hugging Face directory holds them."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = load_stage(None, start=0, end=1).tokenizer  # the embedded model's first layer, for its tokenizer
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": tokenizer.chat_template}))


if __name__ == "__main__":
    main()

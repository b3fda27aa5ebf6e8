"""A Hugging Face model directory with random bf16 weights shaped like a known model (`ringlet.models.shapes`) and
the embedded model's tokenizer and chat template (its ids all fall inside the larger vocabulary), for serving
benchmarks on machines that cannot download real weights: `ringlet node --model DIR`.

Usage: python scripts/write_random_checkpoint.py llama-3.1-8b DIR [--device cuda]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ringlet.models.loader import load_stage
from ringlet.models.random_checkpoint import random_weights, shape_config
from ringlet.models.registry import model_args
from ringlet.models.shapes import SHAPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("directory", type=Path)
    parser.add_argument("--device", default="cpu", help="where the random values are drawn (cuda is faster)")
    args = parser.parse_args()
    config = shape_config(args.shape) | {"torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    args.directory.mkdir(parents=True, exist_ok=True)
    weights = random_weights(model_args(config), torch.bfloat16, args.device)
    save_file({name: tensor.cpu().contiguous() for name, tensor in weights.items()},
              str(args.directory / "model.safetensors"))
    (args.directory / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = load_stage(None, start=0, end=1).tokenizer  # the embedded model's first layer, for its tokenizer
    tokenizer.backend.save(str(args.directory / "tokenizer.json"))
    (args.directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": tokenizer.chat_template}))
    print(f"{args.directory}: random {args.shape}, {sum(t.numel() for t in weights.values()) / 1e9:.2f}B parameters")


if __name__ == "__main__":
    main()

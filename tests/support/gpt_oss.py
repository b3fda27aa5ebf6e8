"""Tiny random GPT-OSS checkpoints saved by transformers, and an MXFP4 one made from them by a small reference
quantiser (the tests of `ringlet/models/gpt_oss.py`, on CPUs and GPUs)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from ringlet.shared.tasks import SamplingParams, TextGenerationTask
from ringlet.worker.batching import BatchGenerator, BatchModel

LAYERS, HIDDEN, WIDTH, EXPERTS, VOCAB, WINDOW, ORIGINAL = 4, 64, 32, 4, 128, 8, 16
CONFIG = {"hidden_size": HIDDEN, "intermediate_size": WIDTH, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16, "vocab_size": VOCAB, "num_local_experts": EXPERTS,
          "num_experts_per_tok": 2, "sliding_window": WINDOW, "max_position_embeddings": 8 * ORIGINAL,
          # even layers slide, odd ones attend every position (transformers' default pattern, written out)
          "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
          "rope_parameters": {"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
                              "truncate": False, "original_max_position_embeddings": ORIGINAL, "rope_theta": 10000.0}}
PROMPT = 45  # past the window and yarn's original length
E2M1_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def reference_model() -> transformers.GptOssForCausalLM:
    """Random weights with norms not all ones, sinks and biases that matter, routers large enough that the experts'
    weights differ, and a peaked embedding and head so that greedy choices are no near-ties."""
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**CONFIG)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif "sinks" in name:
                p.normal_(0.0, 1.0)
            elif "router" in name:
                p.mul_(50)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "embed_tokens" in name or "lm_head" in name:
                p.mul_(20)
            elif "experts" in name:  # some gate and up values past the clamp's limit
                p.mul_(40)
    return model


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A small reference quantiser: weight [..., K] -> blocks uint8 [..., K / 32, 16] and scales uint8 [..., K / 32];
    each group of 32 scaled by the smallest power of two that brings it within e2m1's +-6, each value the nearest
    e2m1 one (low nibble: the even element)."""
    groups = weight.reshape(*weight.shape[:-1], -1, 32)
    exponent = torch.log2(groups.abs().amax(-1) / 6).ceil().clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    codes = (scaled.abs()[..., None] - E2M1_MAGNITUDES).abs().argmin(-1) | ((scaled < 0).long() << 3)
    pairs = codes.view(*codes.shape[:-1], 16, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8), (exponent + 127).to(torch.uint8)


def write_mxfp4_checkpoint(reference: transformers.GptOssForCausalLM, float_dir: Path, path: Path) -> None:
    """The float checkpoint with every expert's gate_up and down as MXFP4 blocks and scales (as published gpt-oss
    checkpoints store them: [E, out, in / 32, 16] and [E, out, in / 32]), and the reference's experts set to those
    weights dequantised by transformers' own MXFP4 code."""
    tensors = load_file(float_dir / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        stored = tensors.pop(name)  # [E, in, out]
        blocks, scales = quantize_mxfp4(stored.transpose(1, 2))
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
        dequantized = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        assert torch.linalg.norm(dequantized - stored) < 0.2 * torch.linalg.norm(stored)  # a sane quantiser
        reference.get_parameter(name).data.copy_(dequantized)
    path.mkdir()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config))


# one prompt past the window, one within it at first
ENGINE_PROMPTS = [list(range(3, 3 + 41)), [5, 17, 3, 99, 42, 8]]


def generate_two_at_once(engine: BatchModel, new_tokens: int) -> list[list[int]]:
    """Greedy tokens of `ENGINE_PROMPTS` generated together, prompts in chunks of 16 tokens (the later chunks attend
    the cached prefix through the window)."""
    generator = BatchGenerator(engine, max_step_tokens=16, max_running=4)
    for n, prompt in enumerate(ENGINE_PROMPTS):
        generator.submit(TextGenerationTask(task_id=f"t{n}", prompt=" ".join(f"t{i}" for i in prompt),
                                            max_tokens=new_tokens, ignore_eos=True,
                                            sampling=SamplingParams(temperature=0)))
    tokens: dict[str, list[int]] = {f"t{n}": [] for n in range(len(ENGINE_PROMPTS))}
    while generator:
        for chunk in generator.step():
            if chunk.token_id is not None:
                tokens[chunk.task_id].append(chunk.token_id)
    return [tokens[f"t{n}"] for n in range(len(ENGINE_PROMPTS))]


def reference_greedy(reference: transformers.GptOssForCausalLM, prompt: list[int], new_tokens: int) -> list[int]:
    return reference.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()

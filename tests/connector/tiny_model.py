"""A random-weight Llama and a word-level tokenizer, written offline into a directory vLLM can load.

The model is tiny (2 layers, hidden 256 by default) so that a vLLM CPU engine starts in seconds; the weights
are random (seeded), so generations are gibberish but deterministic, which is all the connector tests need:
the same prompt must give the same tokens whether its KV came from recompute, the prefix cache or a
connector.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kvstrata.connector.spec import EngineSpec

#: The words of the tokenizer's vocabulary after the special tokens; ``build_tiny_llama`` pads them with
#: ``w<N>`` up to ``vocab`` entries.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


def _words(vocab: int) -> list[str]:
    base = [
        "the", "a", "of", "and", "to", "in", "is", "it", "that", "cache", "key", "value", "block", "token",
        "layer", "head", "model", "store", "load", "save", "hit", "miss", "prefix", "page", "tier",
    ]  # fmt: skip
    words = list(SPECIAL_TOKENS) + base
    i = 0
    while len(words) < vocab:
        words.append(f"w{i}")
        i += 1
    return words[:vocab]


def build_tiny_llama(
    dir: str | Path,
    *,
    num_layers: int = 2,
    hidden: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 512,
    max_pos: int = 2048,
    seed: int = 0,
) -> Path:
    """Write a random float32 Llama (config, safetensors weights) and a fast tokenizer into ``dir``.

    ``hidden // heads`` (the head size) must be 32 or 64: vLLM's CPU attention rejects 16. Nothing is
    downloaded. Returns ``dir`` as a Path.
    """
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden {hidden} must divide by heads {heads}, heads by kv_heads {kv_heads}")
    head_dim = hidden // heads
    if head_dim not in (32, 64):
        raise ValueError(f"head_dim {head_dim} (hidden/heads) must be 32 or 64 (vLLM's CPU build rejects 16)")
    if vocab < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab {vocab} is too small")

    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)  # float32: the default dtype; config.dtype says so on disk
    # The default init (std 0.02) gives near-uniform logits; a larger spread makes greedy decoding decisive,
    # so that float noise between code paths does not flip the argmax.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(out, safe_serialization=True)

    words = _words(vocab)
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=max_pos,
    )
    fast.save_pretrained(out)
    # The generation defaults vLLM reads; keep them neutral (greedy comes from the request's SamplingParams).
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}), encoding="utf-8"
    )
    return out


def tiny_spec(model_dir: str | Path | None = None, **fields: Any) -> EngineSpec:
    """The connector's view of a tiny model on the CPU build: its geometry from ``model_dir``'s config
    (the defaults of :func:`build_tiny_llama` without one), block 128, chunks of 256, fp32, TP 1; any
    field may be overridden (``model_id`` is the namespace's name, given in the connector's config)."""
    config: dict[str, Any] = {"num_hidden_layers": 2, "num_key_value_heads": 2, "head_dim": 64}
    if model_dir is not None:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    spec: dict[str, Any] = {
        "model_id": str(model_dir or ""),
        "num_layers": config["num_hidden_layers"],
        "num_kv_heads": config["num_key_value_heads"],
        "head_size": config["head_dim"],
        "dtype": "float32",
        "block_size": 128,
        "chunk_tokens": 256,
        "tp_size": 1,
        "engine_layout": "cpu_packed",
    }
    return EngineSpec(**{**spec, **fields})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dir")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--max-pos", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    path = build_tiny_llama(
        a.dir,
        num_layers=a.num_layers,
        hidden=a.hidden,
        heads=a.heads,
        kv_heads=a.kv_heads,
        vocab=a.vocab,
        max_pos=a.max_pos,
        seed=a.seed,
    )
    print(path)


if __name__ == "__main__":
    main()

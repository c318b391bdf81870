"""Random-weight llama GGUF files written with the ``gguf`` package: real files, no downloads."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

__all__ = ["TINY_CHAT_TEMPLATE", "write_llama_gguf"]

# A short Jinja chat template of the kind GGUF files carry in tokenizer.chat_template.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_llama_gguf(
    path: Path,
    *,
    dim: int = 64,
    layers: int = 2,
    heads: int = 4,
    feed_forward: int = 128,
    context: int = 256,
    seed: int = 0,
    name: str = "tiny",
    chat_template: str | None = None,
    padding_bytes: int = 0,
    vocab_size: int | None = None,
    f16: bool = False,
    fim: bool = False,
) -> Path:
    """A llama model llama.cpp can load: byte-level SPM vocabulary, F32 tensors (F16 with ``f16``).

    ``padding_bytes`` adds one extra tensor of that size, for benchmarks that need a large file.
    ``vocab_size`` (at least 260) pads the vocabulary with plain word tokens (``▁w0``, ``▁w1``…),
    so that the embedding and output matrices have a realistic size; ``f16`` stores the weight
    matrices as F16 (the norms stay F32), as most unquantised models ship. Both are for benchmarks.
    ``fim`` names fill-in-the-middle tokens (three byte tokens stand in), as code models carry.
    """
    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)] + ["\u2581"]
    token_types = [2, 3, 3] + [6] * 256 + [1]  # UNKNOWN, CONTROL, CONTROL, BYTE..., NORMAL
    if vocab_size is not None:
        if vocab_size < len(tokens):
            raise ValueError(f"vocab_size must be at least {len(tokens)}")
        extra = vocab_size - len(tokens)
        tokens += [f"\u2581w{index}" for index in range(extra)]
        token_types += [1] * extra
    vocab = len(tokens)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(context)
    writer.add_embedding_length(dim)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(feed_forward)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(dim // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(token_types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    if fim:
        for key, token in (("fim_pre", 3), ("fim_suf", 4), ("fim_mid", 5)):
            writer.add_uint32(f"tokenizer.ggml.{key}_token_id", token)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float16 if f16 else np.float32))

    tensor("token_embd.weight", vocab, dim)
    for layer in range(layers):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(dim, dtype=np.float32))
        tensor(f"{prefix}.attn_q.weight", dim, dim)
        tensor(f"{prefix}.attn_k.weight", dim, dim)
        tensor(f"{prefix}.attn_v.weight", dim, dim)
        tensor(f"{prefix}.attn_output.weight", dim, dim)
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(dim, dtype=np.float32))
        tensor(f"{prefix}.ffn_gate.weight", feed_forward, dim)
        tensor(f"{prefix}.ffn_up.weight", feed_forward, dim)
        tensor(f"{prefix}.ffn_down.weight", dim, feed_forward)
    writer.add_tensor("output_norm.weight", np.ones(dim, dtype=np.float32))
    tensor("output.weight", vocab, dim)
    if padding_bytes:
        writer.add_tensor("padding", rng.integers(0, 255, padding_bytes, dtype=np.uint8).view(np.int8))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

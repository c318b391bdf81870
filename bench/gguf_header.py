"""Reading a GGUF's capabilities: the registry's header reader against the ``gguf`` package's reader.

Run from the repo root:

    .venv/bin/python bench/gguf_header.py [--rounds 5]

It writes three random-weight llama GGUFs whose headers are like real models' (a 32,000-token
vocabulary as Llama 2 and Mistral carry; 151,936 tokens and 28 layers as Qwen2.5 and Qwen3 carry;
and the test suite's tiny one), then, taking turns each round, reads each one's capabilities with
``appliance.models.gguf.read_gguf_metadata`` and with the llama.cpp project's ``gguf.GGUFReader``
(the fields the registry keeps, read the way it read them before; its import timed apart, once, in a
fresh interpreter). Every pull and import reads the header once. It prints the median and min-max
seconds of each, and the ratio. The exit status is 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.models.gguf import read_gguf_metadata
from tests.tiny_model import TINY_CHAT_TEMPLATE, write_llama_gguf

MODELS = {
    "tiny (260 tokens)": {},
    "32k tokens, 2 layers": {"vocab_size": 32_000},
    "152k tokens, 28 layers": {"vocab_size": 151_936, "layers": 28},
}


def with_gguf_package(path: Path) -> dict[str, Any]:
    """What the registry read before: every field decoded by the reader, then the ones it keeps."""
    import gguf

    reader = gguf.GGUFReader(path)
    architecture = reader.fields["general.architecture"].contents()
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return {
        "architecture": architecture,
        "context_length": reader.fields[f"{architecture}.context_length"].contents(),
        "vocab_size": len(tokens.data) if tokens is not None else None,
        "parameter_count": sum(int(tensor.n_elements) for tensor in reader.tensors),
    }


def timed(read: Callable[[Path], dict[str, Any]], path: Path) -> float:
    started = time.perf_counter()
    read(path)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    imported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import time; t = time.perf_counter(); import gguf; print(time.perf_counter() - t)",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    print(
        f"import gguf (with numpy), fresh interpreter: {float(imported.stdout):.3f} s; ours imports nothing"
    )
    with tempfile.TemporaryDirectory() as scratch:
        files = {
            name: write_llama_gguf(
                Path(scratch) / f"{index}.gguf", chat_template=TINY_CHAT_TEMPLATE, **options
            )
            for index, (name, options) in enumerate(MODELS.items())
        }
        for path in files.values():  # both readers find the same header, and warm the page cache
            ours, theirs = read_gguf_metadata(path), with_gguf_package(path)
            assert all(ours.get(key) == value for key, value in theirs.items() if value is not None)
        seconds: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for name, path in files.items():
                seconds.setdefault((name, "ours"), []).append(timed(read_gguf_metadata, path))
                seconds.setdefault((name, "gguf"), []).append(timed(with_gguf_package, path))
    print(f"\nmedian (min-max) over {args.rounds} rounds")
    print("| header | ours, s | gguf.GGUFReader, s | gguf / ours |")
    print("|---|---:|---:|---:|")
    for name in files:
        ours, theirs = seconds[(name, "ours")], seconds[(name, "gguf")]
        print(
            f"| {name} | {statistics.median(ours):.4f} ({min(ours):.4f}-{max(ours):.4f})"
            f" | {statistics.median(theirs):.4f} ({min(theirs):.4f}-{max(theirs):.4f})"
            f" | {statistics.median(theirs) / statistics.median(ours):.0f}x |"
        )


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Build the single executable into dist/appliance and smoke-test it on a tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
make setup
.venv/bin/python -m pip install --quiet "pyinstaller>=6.10"
.venv/bin/pyinstaller --noconfirm --clean --distpath dist --workpath build/pyinstaller packaging/appliance.spec

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python -c "import sys; sys.path.insert(0, '.'); from pathlib import Path; \
from tests.tiny_model import write_llama_gguf; write_llama_gguf(Path('$work/tiny.gguf'))"
dist/appliance --version
dist/appliance --data-dir "$work/data" models import "$work/tiny.gguf" --name smoke
dist/appliance --data-dir "$work/data" models ls
dist/appliance --data-dir "$work/data" models verify
echo "packaging smoke test passed: dist/appliance"

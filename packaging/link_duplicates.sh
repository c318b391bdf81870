#!/usr/bin/env bash
# A wheel holds no symlinks, so llama.cpp's libraries arrive twice: libNAME.so (which ctypes opens)
# and libNAME.so.0 (the soname the libraries link each other by). Make each libNAME.so a symlink
# to its identical .so.N, which the tarball keeps: the CUDA backend alone is 60 MB.
# Usage: packaging/link_duplicates.sh DIST_DIR/_internal/llama_cpp/lib
set -euo pipefail
cd "$1"
for unversioned in lib*.so; do
    for versioned in "$unversioned".[0-9]*; do
        if [[ -f "$versioned" && ! -L "$unversioned" ]] && cmp -s "$unversioned" "$versioned"; then
            ln -sf "$versioned" "$unversioned"
        fi
    done
done

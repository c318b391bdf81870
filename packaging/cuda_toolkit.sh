#!/usr/bin/env bash
# One CUDA toolkit root that CMake's FindCUDAToolkit accepts, made of symlinks: the installed
# toolkit (nvcc, the CUDA runtime) plus cuBLAS from NVIDIA's pip wheel, which the toolkit here
# lacks. Headers and libraries of both are merged into include/ and lib64/ (and the targets/
# tree), with the unversioned libcublas.so/libcublasLt.so links a link step looks for.
# Usage: packaging/cuda_toolkit.sh CUBLAS_DIR OUT_DIR   (CUBLAS_DIR: site-packages/nvidia/cu13)
set -euo pipefail
cublas=$(realpath "$1")
out=$2
cuda=$(realpath "${CUDA_HOME:-/usr/local/cuda}")
target=targets/x86_64-linux

# Link every entry of $1 into $2, except those named in the rest (merged by the caller).
link_entries() {
    local from=$1 to=$2
    shift 2
    mkdir -p "$to"
    for entry in "$from"/*; do
        local name
        name=$(basename "$entry")
        if [[ " $* " != *" $name "* ]]; then ln -sfn "$entry" "$to/$name"; fi
    done
}

rm -rf "$out"
link_entries "$cuda" "$out" include lib lib64 targets
link_entries "$cuda/$target" "$out/$target" include lib
for dir in include "$target/include"; do
    link_entries "$cuda/$target/include" "$out/$dir"
    link_entries "$cublas/include" "$out/$dir"
done
for dir in lib lib64 "$target/lib"; do
    link_entries "$cuda/$target/lib" "$out/$dir"
    link_entries "$cublas/lib" "$out/$dir"
    for lib in libcublas libcublasLt; do
        ln -sfn "$(ls "$cublas/lib/$lib".so.* | head -1)" "$out/$dir/$lib.so"
    done
done
echo "$out: CUDA $("$cuda/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') with cuBLAS from $cublas"

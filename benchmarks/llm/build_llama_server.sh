#!/usr/bin/env bash
# Build llama.cpp's own C++ `llama-server` from the llama.cpp source vendored in the installed
# llama-cpp-python's source distribution (the same llama.cpp the gguf backend runs), for the
# concurrency benchmark's highest anchor (`llama-server -np N`: continuous batching in C++).
# A benchmark set-up step, not part of CI: minutes on 2 cores.
#
#   bash benchmarks/llm/build_llama_server.sh [OUT_DIR]   # default: ~/.cache/tandem/llama-server
#
# Prints the binary's path on its last line. Needs cmake and a C++ compiler; fetches the sdist
# from the package index pip is configured with (no model downloads).
set -euo pipefail
out="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem/llama-server}"
version="$(python -c 'import llama_cpp; print(llama_cpp.__version__)')"
bin="$out/$version/bin/llama-server"
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
mkdir -p "$out/$version"
cd "$out/$version"
if [ ! -d src ]; then
  python -m pip download "llama-cpp-python==$version" --no-binary :all: --no-deps -d sdist -q
  mkdir -p src && tar -xzf sdist/llama_cpp_python-"$version".tar.gz -C src --strip-components=1
fi
cmake -S src/vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=ON >/dev/null
cmake --build build --target llama-server -j "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" >/dev/null
mkdir -p bin && cp build/bin/llama-server bin/
echo "$bin"

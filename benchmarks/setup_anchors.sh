#!/usr/bin/env bash
# Install the llama.cpp anchor for benchmarks/vs_llamacpp.py and benchmarks/vs_llama_server.py,
# outside the project's venv (its torch / transformers / onnxruntime / numpy are left alone).
#
#   bash benchmarks/setup_anchors.sh            # into /work/anchors
#   LMOPS_ANCHORS=/opt/anchors bash benchmarks/setup_anchors.sh
#
# Idempotent: every step is skipped when its result is already there. Needs PyPI (pip), cmake, a C++
# compiler and ninja (apt-get install cmake g++ ninja-build); ~10-15 min on 2 cores. What it makes:
#
#   $LMOPS_ANCHORS/src/llama_cpp_python-$VER/          the llama-cpp-python sdist from PyPI, unpacked
#   $LMOPS_ANCHORS/llama.cpp -> .../vendor/llama.cpp    the llama.cpp source it vendors (convert_hf_to_gguf.py,
#                                                       gguf-py): point LLAMA_CPP_DIR here
#   $LMOPS_ANCHORS/build/                               llama.cpp built once, shared libraries, native CPU flags
#   $LMOPS_ANCHORS/bin/llama-server, llama-bench, llama-quantize, llama-cli  (and lib/libllama.so, libggml*.so)
#   $LMOPS_ANCHORS/venv/                                a venv with llama-cpp-python's Python bindings
#                                                       (built with -DLLAMA_BUILD=OFF: they load lib/libllama.so
#                                                       above through LLAMA_CPP_LIB_PATH, so llama.cpp is
#                                                       compiled once, and bindings and binaries are the same code)
#
# The benchmarks find it through LMOPS_ANCHORS (default /work/anchors), or LLAMA_CPP_DIR (the source tree,
# for convert_hf_to_gguf.py) and llama-server on PATH. They install nothing themselves.
set -euo pipefail

PREFIX="${LMOPS_ANCHORS:-/work/anchors}"
VER="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-$(nproc)}"
SRC="$PREFIX/src/llama_cpp_python-$VER"
mkdir -p "$PREFIX/src"

# 1. A venv of its own (the system python3; nothing goes into the project's .venv).
if [ ! -x "$PREFIX/venv/bin/python" ]; then
    python3 -m venv "$PREFIX/venv"
    "$PREFIX/venv/bin/pip" install -q --upgrade pip
fi

# 2. The llama-cpp-python sdist: its vendor/llama.cpp is the llama.cpp source (GitHub is not needed).
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
    "$PREFIX/venv/bin/pip" download -q --no-binary :all: --no-deps "llama-cpp-python==$VER" -d "$PREFIX/src"
    tar -xzf "$PREFIX/src/llama_cpp_python-$VER.tar.gz" -C "$PREFIX/src"
fi
ln -sfn "$SRC/vendor/llama.cpp" "$PREFIX/llama.cpp"

# 3. llama.cpp's own binaries and shared libraries, native CPU flags (-march=native: AVX2 / AVX-512 /
#    AMX as this CPU has them), no web UI download, no HTTPS.
#    AMX only where it runs: a VM can list amx_tile in /proc/cpuinfo, grant the kernel permission
#    (arch_prctl ARCH_REQ_XCOMP_PERM succeeds) and still trap on the first tile instruction (seen on
#    this project's Intel Xeon VM: llama.cpp's q8_0 prompt processing died of SIGILL at tileloadd).
#    A 15-line probe decides; without AMX, -mno-amx-* keeps ggml's AMX kernels out of the build.
EXTRA_FLAGS=""
if grep -qw amx_tile /proc/cpuinfo; then
    probe="$PREFIX/build-amx-probe"
    cat > "$probe.c" <<'C'
#include <immintrin.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
struct cfg { unsigned char palette, start; unsigned char res[14]; unsigned short colsb[16]; unsigned char rows[16]; };
int main(void) {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) return 2;
    struct cfg c __attribute__((aligned(64)));
    memset(&c, 0, sizeof c);
    c.palette = 1; c.rows[0] = 16; c.colsb[0] = 64;
    _tile_loadconfig(&c);
    _tile_zero(0);
    _tile_release();
    return 0;
}
C
    if ! { gcc -O1 -mamx-tile "$probe.c" -o "$probe" && "$probe"; } 2>/dev/null; then
        echo "AMX is listed but does not run here: building llama.cpp without it"
        EXTRA_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    fi
fi
STAMP="native ${EXTRA_FLAGS:-amx-if-any}"  # rebuild when the flags change
if [ ! -x "$PREFIX/bin/llama-server" ] || [ ! -e "$PREFIX/lib/libllama.so" ] \
        || [ "$(cat "$PREFIX/build.flags" 2>/dev/null)" != "$STAMP" ]; then
    cmake -S "$SRC/vendor/llama.cpp" -B "$PREFIX/build" -G Ninja \
        -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$PREFIX" -DCMAKE_INSTALL_RPATH="$PREFIX/lib" \
        -DCMAKE_C_FLAGS="$EXTRA_FLAGS" -DCMAKE_CXX_FLAGS="$EXTRA_FLAGS" \
        -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON \
        -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_TOOLS_INSTALL=ON
    cmake --build "$PREFIX/build" -j "$JOBS" --target llama-server llama-bench llama-quantize llama-cli
    # install only what the benchmarks use (the full install target would build every tool)
    mkdir -p "$PREFIX/bin" "$PREFIX/lib"
    cp -a "$PREFIX"/build/bin/llama-server "$PREFIX"/build/bin/llama-bench "$PREFIX"/build/bin/llama-quantize \
          "$PREFIX"/build/bin/llama-cli "$PREFIX/bin/"
    find "$PREFIX/build" -name 'lib*.so*' -exec cp -a {} "$PREFIX/lib/" \;
    echo "$STAMP" > "$PREFIX/build.flags"
fi

# 4. The Python bindings, without compiling llama.cpp a second time, plus what they and the converter need.
#    The converter (convert_hf_to_gguf.py) imports torch and transformers: the benchmarks run it with the
#    project's own python (which has both) and the vendored gguf-py, so this venv needs no torch.
if ! LLAMA_CPP_LIB_PATH="$PREFIX/lib" "$PREFIX/venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PREFIX/venv/bin/pip" install -q --no-deps "$SRC"
    "$PREFIX/venv/bin/pip" install -q numpy typing-extensions diskcache jinja2 httpx
fi

LLAMA_CPP_LIB_PATH="$PREFIX/lib" "$PREFIX/venv/bin/python" -c \
    "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'system info:', llama_cpp.llama_print_system_info().decode())"
"$PREFIX/bin/llama-server" --version 2>&1 | tail -n 2
echo "anchors ready in $PREFIX (LMOPS_ANCHORS=$PREFIX; LLAMA_CPP_DIR=$PREFIX/llama.cpp)"

#!/usr/bin/env bash
# bench/gpu_batching.py on a GPU machine that has Python 3.12 with torch (CUDA 13) but no network, no
# espeak-ng and none of whisperd's other dependencies: what `pack` stages travels in four parts.
#
#   bench/gpu_run.sh pack              # here: .gpu/c1 .. .gpu/c4, each under 58 MiB (one transfer each)
#   bench/gpu_run.sh [BENCH ARGS...]   # there, once the four are copied into $STAGE (default /tmp/stage)
#   DEVICE=cpu PYTHON=/path/to/python3.12 bench/gpu_run.sh --quick   # the same steps without a GPU
#
# There it installs the wheels into $SITE (pip --target, no index), joins the model (sha256 checked),
# points ctranslate2's libcublas.so.12 at a libcublas.so.13 when no CUDA 12 one is there (ctranslate2
# calls only cuBLAS functions both have), prints what CUDA ctranslate2 sees, transcribes one clip, then runs
# the bench into $OUT (default bench/results). Everything printed also goes to $OUT/log.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
STAGE=${STAGE:-/tmp/stage}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-$REPO/bench/results}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
LIB_ROOTS=${LIB_ROOTS:-/opt /usr/local /usr/lib/x86_64-linux-gnu /usr/lib64}  # where CUDA libraries are sought
MIB=$((1024 * 1024))
LIMIT_BYTES=$((58 * MIB))

step() { printf '\n==== %s (%s)\n' "$*" "$(date +%T)"; }

# ---- here ------------------------------------------------------------------------------------------------

wheels() {  # DEST NAME==VERSION...: CPython 3.12 manylinux wheels
    local dest=$1
    shift
    .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dest" "$@"
}

pack() {
    local gpu=.gpu tmp
    mkdir -p $gpu/c1 $gpu/c2 $gpu/c3 $gpu/c4
    rm -rf $gpu/c*/model.bin.gz.* $gpu/c2/whisper-base $gpu/c2/corpus
    # whisperd's dependencies the machine lacks (it has numpy, onnxruntime, tokenizers, huggingface-hub,
    # uvloop, prometheus-client, nvidia-ml-py): faster-whisper and its engine, msgspec, aiohttp and its own
    wheels $gpu/c1 ctranslate2==4.8.5 faster-whisper==1.2.1 msgspec==0.23.0 tqdm==4.70.1 aiohttp==3.14.5 \
        aiohappyeyeballs==2.7.1 aiosignal==1.4.0 attrs==26.1.0 frozenlist==1.8.0 multidict==7.2.1 \
        propcache==0.5.4 yarl==1.25.1 idna==3.20 typing_extensions==4.16.0
    wheels $gpu/c2 av==18.1.0
    .venv/bin/python bench/gpu_batching.py --pack-corpus $gpu/c2/corpus
    # The multilingual Whisper base (tests/support/models.py), gzipped, in 8 MiB pieces spread over the parts
    tmp=$(mktemp -d)
    .venv/bin/python -c 'import sys; from pathlib import Path; from tests.support.models import multilingual_base
multilingual_base(Path(sys.argv[1]))' "$tmp"
    mkdir -p $gpu/c2/whisper-base
    cp "$tmp"/whisper-base/config.json $gpu/c2/whisper-base/
    xz -9 -c "$tmp"/whisper-base/tokenizer.json >$gpu/c2/whisper-base/tokenizer.json.xz
    xz -9 -c "$tmp"/whisper-base/vocabulary.json >$gpu/c2/whisper-base/vocabulary.json.xz
    sha256sum <"$tmp"/whisper-base/model.bin | cut -d' ' -f1 >$gpu/c2/whisper-base/model.bin.sha256
    gzip -6 -c "$tmp"/whisper-base/model.bin | split -b 8M -d -a 2 - "$tmp"/model.bin.gz.
    local n=0 piece part
    for piece in "$tmp"/model.bin.gz.*; do  # 00-06: c3, 07-13: c4, 14: c1, the rest: c2
        part=$((n < 7 ? 3 : n < 14 ? 4 : n == 14 ? 1 : 2))
        mv "$piece" $gpu/c$part/
        n=$((n + 1))
    done
    echo $n >$gpu/c2/whisper-base/model.bin.pieces
    rm -rf "$tmp"
    du -sh $gpu/c1 $gpu/c2 $gpu/c3 $gpu/c4
    for part in $gpu/c1 $gpu/c2 $gpu/c3 $gpu/c4; do
        (($(du -sb $part | cut -f1) < LIMIT_BYTES)) || { echo "$part is over 58 MiB" >&2; exit 1; }
    done
}

# ---- there -----------------------------------------------------------------------------------------------

find_lib() {  # the first file (or link) of that name under $LIB_ROOTS; nothing when there is none
    # shellcheck disable=SC2086
    { find $LIB_ROOTS -name "$1" \( -type f -o -type l \) 2>/dev/null || true; } | sort | head -1 || true
}

cuda_libraries() {
    local cublas12 cublas13 lt
    cublas12=$(find_lib 'libcublas.so.12*')
    if [[ -n $cublas12 ]]; then
        echo "CUDA 12 cuBLAS found: $cublas12"
        export LD_LIBRARY_PATH=$(dirname "$cublas12")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        return
    fi
    cublas13=$(find_lib 'libcublas.so.13*')
    if [[ -z $cublas13 ]]; then
        echo "NO libcublas.so.12 OR libcublas.so.13 ON THIS MACHINE: ctranslate2 cannot run on CUDA"
        return
    fi
    cublas13=$(realpath "$cublas13")
    lt=$(find_lib 'libcublasLt.so.13*')
    mkdir -p /tmp/cublas12
    ln -sf "$cublas13" /tmp/cublas12/libcublas.so.12
    echo "libcublas.so.12 -> $cublas13 (libcublasLt: ${lt:-not found})"
    export LD_LIBRARY_PATH=/tmp/cublas12:$(dirname "$cublas13")${lt:+:$(dirname "$(realpath "$lt")")}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
}

run() {
    local model=$STAGE/whisper-base  # "base" in the name: whisperd's memory estimate goes by it
    step "stage $STAGE"
    ls -la "$STAGE" && du -sh "$STAGE"
    step "wheels into $SITE"
    "$PY" --version
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$STAGE"/*.whl
    else  # no pip: wheels are zip files, and none of these has scripts or data
        for wheel in "$STAGE"/*.whl; do "$PY" -m zipfile -e "$wheel" "$SITE"; done
    fi
    export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
    step "model $model"
    local pieces
    pieces=$(find "$STAGE" -maxdepth 1 -name 'model.bin.gz.*' | wc -l)
    if [[ ! -f $model/model.bin && $pieces != $(cat "$model/model.bin.pieces") ]]; then
        echo "MODEL INCOMPLETE: $pieces of $(cat "$model/model.bin.pieces") pieces in $STAGE (a part not copied?)"
        exit 1
    fi
    if [[ ! -f $model/model.bin ]]; then
        cat "$STAGE"/model.bin.gz.* | "$PY" -c 'import gzip, shutil, sys
shutil.copyfileobj(gzip.GzipFile(fileobj=sys.stdin.buffer), sys.stdout.buffer, 1 << 20)' >"$model/model.bin.tmp"
        mv "$model/model.bin.tmp" "$model/model.bin"
        for name in tokenizer.json vocabulary.json; do
            "$PY" -c 'import lzma, shutil, sys
shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$model/$name.xz" "$model/$name"
        done
    fi
    if [[ $(sha256sum <"$model/model.bin" | cut -d' ' -f1) != $(cat "$model/model.bin.sha256") ]]; then
        echo "MODEL CORRUPT: model.bin's sha256 differs from model.bin.sha256 (a piece missing?)"
        ls -la "$STAGE"/model.bin.gz.*
        exit 1
    fi
    ls -la "$model"
    step "GPU and CUDA libraries"
    nvidia-smi -L || echo "no nvidia-smi"
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true
    if [[ $DEVICE == cuda ]]; then
        cuda_libraries
    fi
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    ldconfig -p 2>/dev/null | grep -E 'libcuda\.so|libnvidia-ml|libcublas' || true
    "$PY" -c 'import ctranslate2
n = ctranslate2.get_cuda_device_count()
print("ctranslate2", ctranslate2.__version__, "- CUDA devices it sees:", n)
print("compute types:", ctranslate2.get_supported_compute_types("cuda" if n else "cpu"))'
    step "smoke test: one clip on $DEVICE"
    if ! "$PY" - "$model" "$STAGE/corpus/clip00.flac" "$DEVICE" <<'EOF'; then
import sys, time
import ctranslate2
from faster_whisper import WhisperModel
model_dir, clip, device = sys.argv[1:]
t0 = time.perf_counter()
try:
    model = WhisperModel(model_dir, device=device, compute_type="float16" if device == "cuda" else "int8")
    segments, info = model.transcribe(clip, beam_size=5)
    text = " ".join(s.text.strip() for s in segments)
except Exception as exc:
    print(f"CTRANSLATE2 CANNOT USE {device.upper()}: {type(exc).__name__}: {exc}")
    print("ctranslate2.get_cuda_device_count() =", ctranslate2.get_cuda_device_count())
    raise
print(f"{info.language} ({info.language_probability:.2f}) in {time.perf_counter() - t0:.1f} s: {text}")
EOF
        echo "SMOKE TEST FAILED on $DEVICE: no bench run"
        exit 1
    fi
    step "bench"
    PYTHONUNBUFFERED=1 "$PY" bench/gpu_batching.py --device "$DEVICE" --model "$model" \
        --corpus "$STAGE/corpus" --out "$OUT" "$@"
    step "done"
    nvidia-smi || true
}

if [[ ${1:-} == pack ]]; then
    pack
else
    mkdir -p "$OUT"
    run "$@" 2>&1 | tee -a "$OUT/log.txt"
fi

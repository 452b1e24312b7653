#!/usr/bin/env bash
# Low-bit runs on a lent GPU: auto-round, and ours, on the exact windows of the CPU grid.
#
# The device machine has no network and takes 64 MiB a call, and a warm machine keeps its
# files for 30 s between calls. So (benchmarks/README.md, "auto-round at its defaults on
# a lent GPU"): the bundled model goes over in five chunks (.xfer/p0 .. p4, each call
# copying its chunk to $X), with the wheels the image lacks in .whl, then
#
#   bash benchmarks/lowbit_device.sh model              # rebuild + check it; install
#   bash benchmarks/lowbit_device.sh autoround w3g128 3 128 [ITERS BATCH]
#   bash benchmarks/lowbit_device.sh ours w3-ours RECIPE.yaml
#   bash benchmarks/lowbit_device.sh fetch NAME [PART]  # wait, then results into $OUT
#
# Runs go on in their own process session between calls, one after another (a queue).
# Both take the windows in $X/$WINDOWS (a `--calib` token-windows file: the CPU grid's
# seed-0 32 text + 96 sampled windows, tokens sha256 376ad85f...). auto-round's result
# comes back as grouped_transfer.py's exact codebook + codes; ours as its checkpoint
# folder in 15 MiB pieces of a tar, 4 pieces per `fetch NAME PART` (PART 0, 1, ...).
# Locally, for a dry run: X, MODEL, RUNS, OUT, PY, DEVICE, SAMPLES and SKIP_INSTALL=1
# override.
set -euo pipefail
X=${X:-/root/xfer}
MODEL=${MODEL:-/root/smollm2-135m}
RUNS=${RUNS:-/root/lowbit}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
SITE=${SITE:-/tmp/site}
WINDOWS=${WINDOWS:-calib-seed0-sampled96.safetensors}
PIECES_PER_FETCH=4

model() {
    mkdir -p "$MODEL" "$RUNS"
    cat "$X"/part-0 "$X"/part-1 "$X"/part-2 "$X"/part-3 "$X"/part-4 > "$MODEL/model.safetensors"
    cp "$X"/config.json "$X"/generation_config.json "$X"/tokenizer.json \
        "$X"/tokenizer_config.json "$X"/chat_template.jinja "$MODEL/"
    echo "$(cat "$X/model.sha256")  $MODEL/model.safetensors" | sha256sum -c -
    if [ -z "${SKIP_INSTALL:-}" ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" .whl/*.whl
        $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
            --target "$SITE" .
    fi
    cp benchmarks/peer_autoround.py benchmarks/grouped_transfer.py "$RUNS/"
    $PY -c "import torch, transformers; print(torch.__version__, transformers.__version__,
        torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
}

queue() {  # NAME COMMAND...: run after the runs queued before it, in its own session
    local name=$1
    shift
    local before
    before=$(tail -n 1 "$RUNS/queue.txt" 2>/dev/null || true)
    echo "$name" >> "$RUNS/queue.txt"
    printf '%s\n' "$*" > "$RUNS/$name.cmd"
    setsid nohup bash -c "
        export PYTHONPATH=$SITE PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 COMPRESS_OFFLINE=1
        cd '$RUNS'  # not the checkout: its compress/ would shadow the installed package
        while [ -n '$before' ] && [ ! -f '$RUNS/$before.rc' ]; do sleep 1; done
        start=\$(date +%s)
        ( $* ) > '$RUNS/$name.log' 2>&1
        rc=\$?
        echo \$(( \$(date +%s) - start )) > '$RUNS/$name.seconds'
        echo \$rc > '$RUNS/$name.rc'" > /dev/null 2>&1 < /dev/null &
}

autoround() {  # NAME BITS GROUP [ITERS BATCH]
    local name=$1 bits=$2 group=$3 iters=${4:-200} batch=${5:-8}
    $PY -c "import torch; from safetensors.torch import load_file
torch.save(load_file('$X/$WINDOWS')['windows'], '$RUNS/ids.pt')"
    queue "$name" "$PY $RUNS/peer_autoround.py --model $MODEL --calib-ids $RUNS/ids.pt \
        --bits $bits --group-size $group --iters $iters --batch-size $batch \
        --device $DEVICE --out $RUNS/$name --json $RUNS/$name.json \
        && $PY $RUNS/grouped_transfer.py pack $RUNS/$name $MODEL --bits $bits \
        --group-size $group --out $RUNS/$name-out"
}

ours() {  # NAME RECIPE: the recipe on the carried windows, all 128 of them, then a tar
    local name=$1 recipe=$2
    cp "$recipe" "$RUNS/$name.yaml"
    queue "$name" "$PY -m compress.cli quantize $MODEL --recipe $RUNS/$name.yaml \
        --calib $X/$WINDOWS --calib-samples ${SAMPLES:-128} --calib-sampled 0 --device $DEVICE \
        --threads $(nproc) --no-eval --out $RUNS/$name \
        && mkdir -p $RUNS/$name-out && tar -C $RUNS -cf - $name \
        | split -b 15M -d -a 2 - $RUNS/$name-out/$name.tar."
}

fetch() {  # NAME [PART]
    local name=$1 part=${2:-0}
    for _ in $(seq 1 "${WAIT_S:-540}"); do
        [ -f "$RUNS/$name.rc" ] && break
        sleep 1
    done
    tail -n 5 "$RUNS/$name.log" 2>/dev/null || true
    cp "$RUNS/$name.log" "$OUT/" 2>/dev/null || true
    [ -f "$RUNS/$name.rc" ] || { echo "$name still running"; exit 3; }
    [ "$(cat "$RUNS/$name.rc")" = 0 ] || { echo "$name failed"; exit 1; }
    cp "$RUNS/$name.seconds" "$OUT/"
    [ -f "$RUNS/$name.json" ] && cp "$RUNS/$name.json" "$OUT/"
    cp "$RUNS/$name-out"/*.json "$OUT/" 2>/dev/null || true
    ls "$RUNS/$name-out" | grep -v '[.]json$' | sort | tail -n +$((part * PIECES_PER_FETCH + 1)) \
        | head -n $PIECES_PER_FETCH | while read -r f; do cp "$RUNS/$name-out/$f" "$OUT/"; done
    echo "pieces in all: $(ls "$RUNS/$name-out" | grep -vc '[.]json$')"
    ls -la "$OUT"
}

"$@"

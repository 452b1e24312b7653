#!/usr/bin/env bash
# Auto-round at its default steps (200 x 8) on the lent GPU, on our seed-0 32 + 96 windows.
#
# The device machine has no network and takes 64 MiB a call, so the session sends the
# bundled model in five chunks first (.xfer/p0 .. p4, each call copying its chunk to
# /root/xfer), then runs this with the wheels of auto-round and the packages the image
# lacks in .whl (benchmarks/README.md, "auto-round on a GPU"):
#
#   bash benchmarks/autoround_device.sh start   # rebuild + check the model, start both runs
#   bash benchmarks/autoround_device.sh fetch w3g128   # wait for one, pack it into $OUT
#
# The runs go on in their own process session between calls; each result comes back as
# grouped_transfer.py's exact codebook + codes, rebuilt and scored here by
# `python benchmarks/grouped_transfer.py unpack` and lowbit's harness.
set -euo pipefail
X=/root/xfer
MODEL=/root/smollm2-135m
RUNS=/root/autoround
SETTINGS="w3g128:3:128 w2g64:2:64"

start() {
    mkdir -p "$MODEL" "$RUNS"
    cat "$X"/part-0 "$X"/part-1 "$X"/part-2 "$X"/part-3 "$X"/part-4 > "$MODEL/model.safetensors"
    cp "$X"/*.json "$X"/chat_template.jinja "$MODEL/"
    echo "$(cat "$X/model.sha256")  $MODEL/model.safetensors" | sha256sum -c -
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    cp benchmarks/peer_autoround.py benchmarks/grouped_transfer.py "$RUNS/"
    cat > "$RUNS/all.sh" <<EOF
set -u
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
for s in $SETTINGS; do
    IFS=: read -r name bits group <<< "\$s"
    python3 $RUNS/peer_autoround.py --model $MODEL --calib-ids $X/calib_ids-seed0-sampled96.pt \
        --bits \$bits --group-size \$group --iters 200 --batch-size 8 --device cuda \
        --out $RUNS/\$name --json $RUNS/\$name.json > $RUNS/\$name.log 2>&1 \
    && python3 $RUNS/grouped_transfer.py pack $RUNS/\$name $MODEL --bits \$bits \
        --group-size \$group --out $RUNS/\$name-packed >> $RUNS/\$name.log 2>&1
    echo \$? > $RUNS/\$name.rc
done
EOF
    setsid nohup bash "$RUNS/all.sh" > "$RUNS/all.log" 2>&1 < /dev/null &
    nvidia-smi --query-gpu=name,memory.used --format=csv
    python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
}

fetch() {
    local name=$1
    for _ in $(seq 1 ${WAIT_S:-560}); do
        [ -f "$RUNS/$name.rc" ] && break
        sleep 1
    done
    tail -n 5 "$RUNS/$name.log" || true
    cp "$RUNS/$name.log" "$OUT/"
    [ -f "$RUNS/$name.rc" ] || { echo "$name still running"; exit 3; }
    [ "$(cat "$RUNS/$name.rc")" = 0 ] || { echo "$name failed"; exit 1; }
    cp "$RUNS/$name.json" "$RUNS/$name-packed"/* "$OUT/"
    ls -la "$OUT"
}

"$@"

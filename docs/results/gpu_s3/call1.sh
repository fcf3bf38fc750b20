#!/bin/bash
# Session 3, GPU call 1 (one H200): issue 17's test_train, issue 18's NCCL HSDP/TP test, issue 16's 60M
# quality runs (in parallel), then issue 16's LLaMA-7B memory table (one run after another).
mkdir -p "$OUT"
( python3 -m pytest -q tests/test_train.py > "$OUT/test_train.log" 2>&1; echo "rc=$?" >> "$OUT/test_train.log" ) &
( python3 -m pytest -q tests/test_hsdp.py -k nccl tests/test_quant.py tests/test_layerwise.py -k "nccl or cuda or int8 or round or unbiased" \
    > "$OUT/test_hsdp_nccl_quant.log" 2>&1; echo "rc=$?" >> "$OUT/test_hsdp_nccl_quant.log" ) &
C="--engine single --model 60m --steps 1000 --global-batch-size 32 --micro-batch-size 32 --seq-len 256 --eval-every 100 --warmup-steps 100 --seed 0 --optimizer apollo-mini --lr 1e-2 --no-progress"
( python3 launch/train.py $C --metrics-file "$OUT/q60_mini.jsonl" > "$OUT/q60_mini.log" 2>&1 ) &
( python3 launch/train.py $C --layerwise --metrics-file "$OUT/q60_mini_layerwise.jsonl" > "$OUT/q60_mini_layerwise.log" 2>&1 ) &
( python3 launch/train.py $C --layerwise --weight-quant int8 --metrics-file "$OUT/q60_qmini_layerwise.jsonl" > "$OUT/q60_qmini_layerwise.log" 2>&1 ) &
M="--engine single --model 7b --seq-len 256 --global-batch-size 1 --micro-batch-size 1 --param-dtype bf16 --dtype bf16 --probe-micro-batches 1 --steps 6 --no-progress"
for row in "adamw:--optimizer adamw" "mini:--optimizer apollo-mini" "mini_layerwise:--optimizer apollo-mini --layerwise" \
           "apollo_layerwise:--optimizer apollo --layerwise" "qmini_layerwise:--optimizer apollo-mini --layerwise --weight-quant int8"; do
  name=${row%%:*}; flags=${row#*:}
  python3 launch/train.py $M $flags --metrics-file "$OUT/mem7b_$name.jsonl" > "$OUT/mem7b_$name.log" 2>&1
  echo "$name rc=$?" >> "$OUT/mem7b_done.txt"
done
wait
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt"

#!/bin/bash
# Session 3, GPU call 2 (one H200): call 1's runs whose outputs did not come back (issue 17's test_train,
# issue 18's NCCL test, issue 16's 60M quality runs and two 7B memory rows), then issue 14's 7B start-up
# (ZeRO-3 and FSDP2, one launch each, alone on the machine). Results: $R (tarred by the caller).
R=${R:-$OUT/r}; mkdir -p "$R"
( python3 -m pytest -q tests/test_train.py > "$R/test_train.log" 2>&1; echo "rc=$?" >> "$R/test_train.log" ) &
( python3 -m pytest -q tests/test_hsdp.py -k nccl tests/test_quant.py tests/test_layerwise.py -k "nccl or cuda or int8 or round or unbiased" \
    > "$R/test_hsdp_nccl_quant.log" 2>&1; echo "rc=$?" >> "$R/test_hsdp_nccl_quant.log" ) &
C="--engine single --model 60m --steps 1000 --global-batch-size 32 --micro-batch-size 32 --seq-len 256 --eval-every 100 --warmup-steps 100 --seed 0 --optimizer apollo-mini --lr 1e-2 --no-progress"
( python3 launch/train.py $C --metrics-file "$R/q60_mini.jsonl" > "$R/q60_mini.log" 2>&1 ) &
( python3 launch/train.py $C --layerwise --metrics-file "$R/q60_mini_layerwise.jsonl" > "$R/q60_mini_layerwise.log" 2>&1 ) &
( python3 launch/train.py $C --layerwise --weight-quant int8 --metrics-file "$R/q60_qmini_layerwise.jsonl" > "$R/q60_qmini_layerwise.log" 2>&1 ) &
M="--engine single --model 7b --seq-len 256 --global-batch-size 1 --micro-batch-size 1 --param-dtype bf16 --dtype bf16 --probe-micro-batches 1 --steps 6 --no-progress"
for row in "mini_layerwise:--optimizer apollo-mini --layerwise" "qmini_layerwise:--optimizer apollo-mini --layerwise --weight-quant int8"; do
  name=${row%%:*}; flags=${row#*:}
  python3 launch/train.py $M $flags --metrics-file "$R/mem7b_$name.jsonl" > "$R/mem7b_$name.log" 2>&1
  echo "$name rc=$?" >> "$R/done.txt"
done
wait
echo "parallel part done $(date +%T)" >> "$R/done.txt"
python3 tools/bench_dist.py --world 1 --model 7b --seq-len 256 --micro-batch 4 --steps 3 --warmup 1 --engines zero3,fsdp2 \
  --optimizers apollo-mini --activation-checkpointing --json "$R/startup7b.json" > "$R/startup7b.log" 2>&1
echo "startup rc=$? $(date +%T)" >> "$R/done.txt"

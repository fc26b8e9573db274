#!/bin/bash
# usage: copyab.sh <label> <pkgdir> [<label> <pkgdir> ...]; env N (pairs)
source /work/venv311/bin/activate
for i in $(seq 1 ${N:-2}); do
  set -- "$@"
  args=("$@")
  for ((k=0; k<${#args[@]}; k+=2)); do
    lab=${args[k]}; dir=${args[k+1]}
    s=$(date +%s.%N)
    (cd /tmp && PYTHONPATH=$dir python -m nnrnn_fused.train copy --no-progress --out-dir /tmp/copyab-$lab-$i ${EXTRA} > /tmp/copyab-$lab-$i.log 2>&1)
    e=$(date +%s.%N)
    echo "$lab run $i: $(echo "$e - $s" | bc) s wall; $(python -c "import json;d=json.load(open('/tmp/copyab-$lab-$i/summary.json'));print({k:v for k,v in d.items() if 'time' in k or 'loss' in k})")"
  done
done

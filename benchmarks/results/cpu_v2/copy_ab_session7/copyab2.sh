#!/bin/bash
# usage: copyab2.sh "<label>|<pkgdir>|<env>" ...; env N (rounds). Prints train seconds from summary.json
source /work/venv311/bin/activate
for i in $(seq 1 ${N:-2}); do
  for spec in "$@"; do
    IFS='|' read lab dir envs args <<< "$spec"
    (cd /tmp && env $envs PYTHONPATH=$dir python -m nnrnn_fused.train copy --no-progress --out-dir /tmp/copyab-$lab-$i ${EXTRA} $args > /tmp/copyab-$lab-$i.log 2>&1)
    echo "$lab $i $(python -c "import json;d=json.load(open('/tmp/copyab-$lab-$i/summary.json'));print({k:v for k,v in d.items() if 'sec' in k or 'time' in k or 'final_train_loss'==k})")"
  done
done

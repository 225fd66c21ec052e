#!/bin/bash
# Every model family at the gpu preset, trained eager and then compiled (same seed and steps) with
# bench/gpu_training.py, one after the other on the GPU; each compiled model is exported (native; phi3
# also int4 and ternary PTQ), evaluated and health-checked (bench/export_release.py) on CPUs the
# training does not use, while the GPU trains the next family. docs/training.md has the figures.
#
#   [FAMS="smallthinker bitnet phi3 openelm"] [STEPS=200] [PRESET=gpu] [DEVICE=cuda] [TCPU=0-7] [ECPU=8-15] \
#   [EXPORT_ONLY="fam ..."] OUT=DIR bash bench/gpu_families.sh
#
# On the GPU machine: wheels that are missing there (pydantic, mlflow-skinny, onnxruntime 1.32, ...)
# under .whl/ (and WHEELS=more.whl), data/prepared carried along. Logs and JSON go to $OUT/fam_logs.tgz.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ${WHEELS:-} 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
echo "sshd: $(command -v sshd || echo none)"
STEPS=${STEPS:-200}; PRESET=${PRESET:-gpu}; DEVICE=${DEVICE:-cuda}; TCPU=${TCPU:-0-7}; ECPU=${ECPU:-8-15}
FAMS=${FAMS:-"smallthinker bitnet phi3 openelm"}; EXPORT_ONLY=${EXPORT_ONLY:-}
mkdir -p $OUT/log
params() {  # family, name, variant, ptq -> params file path
  python3 - "$@" <<'PY'
import sys, yaml
fam, name, variant, ptq = sys.argv[1:5]
raw = yaml.safe_load(open("params.yaml"))
run = f"/tmp/fam/{name}"
raw["model"]["family"] = fam
raw["train"].update({"preset": sys.argv[5], "model_file": f"/tmp/gpu_run/{fam}_compiled/model.pt"})
raw["export"].update({"variant": variant, "ptq": ptq == "1", "out_dir": f"{run}/onnx", "metrics_file": f"{run}/export.json", "threads": 6})
raw["evaluate"].update({"metrics_file": f"{run}/evaluate.json", "release_dir": f"{run}/release", "threads": 2})
raw["tracking"]["uri"] = "off"
path = f"/tmp/fam_{name}.yaml"
yaml.safe_dump(raw, open(path, "w"))
print(path)
PY
}
export_eval() {  # family, name, variant, ptq
  local p; p=$(params "$@" $PRESET)
  taskset -c $ECPU python3 bench/export_release.py $p > $OUT/log/exp_$2.log 2>&1
  echo "exported $2 rc=$?"
}
for fam in $EXPORT_ONLY; do export_eval $fam ${fam}_native native 0 & done
for fam in $FAMS; do
  for mode in eager compiled; do
    flag=""; [ $mode = compiled ] && flag="--compile"
    taskset -c $TCPU timeout 300 python3 bench/gpu_training.py --steps $STEPS --preset $PRESET --device $DEVICE $flag --set model.family=$fam \
      --set train.eval_batches=32 --name ${fam}_$mode > $OUT/log/${fam}_$mode.log 2>&1
    mv $OUT/${fam}_$mode.json $OUT/log/ 2>/dev/null
    grep SUMMARY $OUT/log/${fam}_$mode.log | python3 -c "import json,sys; d=json.loads(sys.stdin.read()[8:]); print(d['name'], 'val', d['final'].get('val_loss'), 'ms', round(d['step_time_s_median']*1000,1), 'tok/s', round(d['tokens_per_s_median']), 'mfu', d['mfu_median'], 'wall', round(d['wall_s']))" || tail -3 $OUT/log/${fam}_$mode.log
  done
  if [ $fam = phi3 ]; then
    export_eval $fam ${fam}_native native 0 &
    export_eval $fam ${fam}_int4 int4 1 &
    export_eval $fam ${fam}_ternary ternary 1 &
  else
    export_eval $fam ${fam}_native native 0 &
  fi
done
wait
for f in /tmp/fam/*/export.json; do python3 -c "
import json,sys; d=json.load(open('$f')); e=json.load(open('$f'.replace('export.json','evaluate.json'))) if __import__('os').path.exists('$f'.replace('export.json','evaluate.json')) else {}
print('$f'.split('/')[3], d.get('variant'), 'ptq', d.get('ptq'), 'MB', round(d.get('model_bytes',0)/1e6,1), 'top1', d.get('top1_agreement'), 'cache', d.get('kv_cache_max_rel_logit_diff'), 'ppl_rel', d.get('ppl_rel_diff'), 'nll_onnx', e.get('nll_onnx'), 'decode', e.get('decode_tokens_per_s'), 'prefill', e.get('prefill_tokens_per_s'))"; done
for d in /tmp/fam/*; do cp $d/export.json $OUT/log/$(basename $d)_export.json 2>/dev/null; cp $d/evaluate.json $OUT/log/$(basename $d)_evaluate.json 2>/dev/null; done
tar czf $OUT/fam_logs.tgz -C $OUT log && rm -rf $OUT/log
ls $OUT

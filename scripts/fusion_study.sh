#!/usr/bin/env bash
# The fusion-options study of docs/results.md: the same pretrained experts per seed, the fusion stage under
# each training option (conf/tuning/), then one study report over all of it.
#   bash scripts/fusion_study.sh [STUDY_FOLDER] [TUNING ...] [-- OVERRIDE ...]
# (default: outputs/fashion_study, every option); overrides after -- go to every run, e.g.
#   bash scripts/fusion_study.sh outputs/fashion_study freeze distill -- 'pipeline.fusions=[multiplicative]'
set -euo pipefail
root=${1:-outputs/fashion_study}
shift || true
options=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do options+=("$1"); shift; done
[ $# -gt 0 ] && shift
overrides=("$@")
[ ${#options[@]} -gt 0 ] || options=(none freeze ensemble_start distill expert_dropout cutmix_smoothing probe own_classes)
python=${PYTHON:-python}
mkdir -p "$root"
for tuning in "${options[@]}"; do
  start=$(date +%s)
  "$python" -m mcn.pipeline experiment=fashion_study "tuning=$tuning" logger=none "hydra.run.dir=$root/$tuning" "${overrides[@]}"
  echo "tuning=$tuning took $(( $(date +%s) - start )) s" | tee -a "$root/wall_times.txt"
done
"$python" -m mcn.evaluate "$root"

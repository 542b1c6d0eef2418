#!/usr/bin/env bash
# The fusion-options study of docs/results.md: the same pretrained experts per seed, the fusion stage under
# each training option (conf/tuning/), then one study report over all of it.
#   bash scripts/fusion_study.sh [STUDY_FOLDER] [TUNING ...]      (default: outputs/fashion_study, every option)
set -euo pipefail
root=${1:-outputs/fashion_study}
shift || true
options=("$@")
[ ${#options[@]} -gt 0 ] || options=(none freeze ensemble_start distill expert_dropout cutmix_smoothing)
python=${PYTHON:-python}
for tuning in "${options[@]}"; do
  start=$(date +%s)
  "$python" -m mcn.pipeline experiment=fashion_study "tuning=$tuning" logger=none "hydra.run.dir=$root/$tuning"
  echo "tuning=$tuning took $(( $(date +%s) - start )) s" | tee -a "$root/wall_times.txt"
done
"$python" -m mcn.evaluate "$root"

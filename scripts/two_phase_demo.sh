#!/usr/bin/env bash
# The paper's two-phase recipe on the demo corpus (README "Two-phase pretraining"): a text phase (MLM),
# an image phase (DINO), a joint phase initialised from both encoders, and joint training from scratch at
# the joint phase's steps and at the recipe's total steps; then one table from MLflow.
#   STEPS=300 scripts/two_phase_demo.sh [key=value ...]   (overrides go to every run)
source "$(dirname "$0")/env.sh"
STEPS=${STEPS:-300}
if [ ! -d demo_data/image_text/train ]; then
    python jobs/prepare_data.py --config jobs/configs/demo.yaml --demo
fi
run() { python jobs/pretrain.py "$@"; }
run --config jobs/configs/demo-phase-text.yaml train.steps="$STEPS" "$@"
run --config jobs/configs/demo-phase-image.yaml train.steps="$STEPS" "$@"
run --config jobs/configs/demo-phase-joint.yaml train.steps="$STEPS" "$@"
for steps in "$STEPS" $((3 * STEPS)); do
    run --config jobs/configs/demo-phase-joint.yaml 'model.init_encoders={}' \
        train.run_name="flava-phase-scratch-$steps" train.steps="$steps" "$@"
done
python jobs/compare_runs.py --config jobs/configs/demo-phase-joint.yaml "$@" --runs flava-phase-text \
    flava-phase-image flava-phase-joint "flava-phase-scratch-$STEPS" "flava-phase-scratch-$((3 * STEPS))"

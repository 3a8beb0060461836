#!/usr/bin/env bash
# Retrain a shipped tiny dLLM with its curriculum and rewrite its model card.
#
#   experiments/train_tiny_models.sh llada      # or: dream; both side by side: one per core
#
# Phases (each continues from the previous checkpoint with --init; the card lists every one):
#   1. addition only: the digit-attention and carry circuits form in ~800 steps on short rows;
#      inside a task mix they took ~2500 steps, and the word problems' digit copies never formed.
#   2. word problems only: copying the prompt's numbers into the worked steps and doing them
#      (~95% exact match on tiny-llada after these 1000 steps, but addition is forgotten).
#   3. all three tasks at half the learning rate, addition's short rows drawn as often as the
#      word problems': recovers addition and learns the comparisons without losing the word problems.
set -euo pipefail
family=${1:?usage: $0 llada|dream}
out=${OUT:-fair_calib/assets/tiny-$family}
threads=${THREADS:-1}
train() { python -m fair_calib.train.tiny --family "$family" --threads "$threads" --out "$out" "$@"; }

train --steps 1000 --lr 0.001 --warmup 50 --task-weights '{"addition": 1}'
train --init "$out" --steps 1000 --lr 0.001 --warmup 50 --task-weights '{"word_problems": 1}'
train --init "$out" --steps 2000 --lr 0.0005 --warmup 20 --task-weights '{"addition": 2, "word_problems": 2, "compare": 1}'
python -m fair_calib.train.card "$out" --threads "$threads"

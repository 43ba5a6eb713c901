#!/usr/bin/env bash
# The study of issue "A study that can tell ABMLL from its baselines": every step resumes where it stopped, so
# the whole study can be accumulated over several sittings by running this script again.
#   bash docs/results/study/run.sh tune        # 1. tune every method on the 'dev' tasks (never 'test')
#   bash docs/results/study/run.sh tune abmll,maml tune-2 &  # a second worker: other methods, another folder,
#   bash docs/results/study/run.sh merge tune-2              # whose finished studies are then copied into tune/
#   bash docs/results/study/run.sh compare 16  # 2. the tuned comparison at k = 16 (then 4); run it twice at once
#                                                 to share its cells out between two workers (abmll compare --resume)
set -euo pipefail
cd "$(dirname "$0")/../../.."
ABMLL=${ABMLL:-.venv/bin/abmll}
HERE=docs/results/study
METHODS=lora,lora-task,structured-lora,reptile,maml,abmll
# Shared by tuning and comparison: the full preset, adapters on the top 4 of SmolLM2's 30 blocks (with the
# frozen-trunk cache) and room for 16 ICL demonstrations.
SHARED=(--preset full --set lora.layers=4 --set scoring.max_length=8192)
case "${1:-}" in
  tune)
    # tune [METHODS [FOLDER]]: the methods of this worker (default all) and its folder under docs/results/study
    # (default tune). 8 trials per method, each trial meta-trains 50 meta-steps from scratch and is scored on the 5 'dev' tasks,
    # one support set each (seed 100; the dev pools hold 165-350 examples, so one seed's query set of up to 100 is
    # about as many questions as three seeds' disjoint thirds, at a third of the adaptation cost); diverged trials
    # count.
    methods=${2:-$METHODS}; out=$HERE/${3:-tune}
    resume=(); [[ -f $out/tune.db ]] && resume=(--resume)
    "$ABMLL" tune --methods "$methods" --trials 8 --seeds 100 "${SHARED[@]}" --set meta.meta_steps=50 \
      --out "$out" "${resume[@]}"
    ;;
  merge)
    # merge FOLDER: copy the studies of a second worker's tune.db into tune/tune.db (Optuna's copy_study; a study
    # already there is an error), then rewrite tune/tuned.json; `run.sh tune` checks that every study was run
    # with the same protocol.
    from=$HERE/${2:?give the folder of the second worker}/tune.db
    .venv/bin/python - "$from" "$HERE/tune/tune.db" <<'PY'
import sys, optuna
source, target = (f"sqlite:///{path}" for path in sys.argv[1:])
for name in optuna.get_all_study_names(source):
    optuna.copy_study(from_study_name=name, from_storage=source, to_storage=target)
    print(f"copied the study of {name}")
PY
    "$0" tune
    ;;
  compare)
    k=${2:?give k: 4 or 16}
    # up to 300 meta-steps, stopped early when the 'dev' NLL has not improved for 4 validations 25 steps apart
    "$ABMLL" compare --methods "zero-shot,icl,$METHODS,abmll-icl" "${SHARED[@]}" --k "$k" \
      --set meta.meta_steps=300 --set meta.validate_every=25 --set meta.patience=4 \
      --tuned "$HERE/tune/tuned.json" --out "$HERE/k$k" --resume
    ;;
  *) echo "usage: $0 tune [METHODS [FOLDER]] | merge FOLDER | compare K" >&2; exit 2 ;;
esac

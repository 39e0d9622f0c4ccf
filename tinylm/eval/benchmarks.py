"""The standard benchmarks, read from the files their authors distribute, as prompts and answers.

Each reader turns one benchmark's layout under ``DIR/<task>/`` into ``Doc``s: the question as the
prompt shows it, the choices, the right one, and the subject (for the description line and few-shot
examples of the same subject). Prompts are lm-evaluation-harness's defaults, so the numbers compare
with published ones (docs/eval.md writes each one out):

=============  ======================================  ===============================================
task           files                                   prompt (continuations)
=============  ======================================  ===============================================
mmlu           ``test/<subject>_test.csv``,            "The following are multiple choice questions
               ``dev/<subject>_dev.csv``               (with answers) about {subject}.\\n\\n" + k dev
                                                       examples + "{question}\\nA. …\\nD. …\\nAnswer:"
                                                       (" A" … " D")
cmmlu          ``test/<subject>.csv``, ``dev/``        "以下是关于{科目}的单项选择题，请直接给出正确答案的
                                                       选项。\\n\\n" … "答案：" (" A" … " D")
ceval          ``val/<subject>_val.csv``, ``dev/``     "以下是中国关于{科目}的单项选择题，请选出其中的正确
                                                       答案。\\n\\n" … "答案：" (" A" … " D")
arc_challenge  ``ARC-Challenge-Test.jsonl`` (AI2's)    "Question: {stem}\\nAnswer:" (" " + each choice)
arc_easy       ``ARC-Easy-Test.jsonl``
hellaswag      ``hellaswag_val.jsonl`` (the authors')  "{activity}: {ctx_a} {Ctx_b}" (" " + each ending)
gsm8k          ``test.jsonl``, ``train.jsonl``         "Question: {question}\\nAnswer:", generated
=============  ======================================  ===============================================

MMLU's CSVs come headerless (question, A, B, C, D, answer letter) as its authors ship them, or with
the header ``question,choice0,…,answer`` (an index) as the Hugging Face copy has them; both are read.
Without ``--data-dir``, ``from_hub`` asks the ``datasets`` library for the same sets.

A file that does not fit its layout stops with the file, the row and what was expected.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tinylm.io import DataError, iter_records

LETTERS = ("A", "B", "C", "D")
SUBJECTS = json.loads((Path(__file__).parent / "subjects.json").read_text(encoding="utf-8"))  # the published names
HUB = {  # task → (dataset id, test split, few-shot split); configs are the subjects
    "mmlu": ("cais/mmlu", "test", "dev"),
    "cmmlu": ("haonan-li/cmmlu", "test", "dev"),
    "ceval": ("ceval/ceval-exam", "val", "dev"),
    "arc_challenge": ("allenai/ai2_arc", "test", "train"),
    "arc_easy": ("allenai/ai2_arc", "test", "train"),
    "hellaswag": ("Rowan/hellaswag", "validation", "train"),
    "gsm8k": ("openai/gsm8k", "test", "train"),
}


@dataclass
class Doc:
    """One benchmark item: ``text`` is what the prompt shows of it (without the answer)."""

    text: str
    choices: list[str]  # the continuations' texts (letters, or answer texts); for generation: []
    gold: int | str  # the right choice's index, or the reference answer of a generation task
    subject: str = ""
    answer_text: str = ""  # what a few-shot example shows after the text (the gold choice, or a worked answer)
    extra: dict = field(default_factory=dict)


@dataclass
class Benchmark:
    """A benchmark's items and what its prompts need: per subject, the description line and the
    few-shot pool (in file order)."""

    name: str
    docs: list[Doc]
    fewshot: dict[str, list[Doc]]
    descriptions: dict[str, str]
    kind: str = "multiple_choice"  # or "generate"
    sampler: str = "first_n"  # how few-shot examples are drawn: the first k, or "random" (seeded, per item)


# -- the letter benchmarks ----------------------------------------------------------------------


def letter_text(question: str, options: list[str], answer_cue: str) -> str:
    lines = [question.strip(), *(f"{letter}. {option}" for letter, option in zip(LETTERS, options))]
    return "\n".join(lines) + "\n" + answer_cue


def csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every row of a CSV file; an unreadable file is a DataError naming it."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows, reader = [], csv.reader(f)
            for cells in reader:
                rows.append((reader.line_num, cells))
            return rows
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})", "not_utf8") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a CSV file ({e})", "invalid_csv") from None


def letter_docs(path: Path, subject: str, answer_cue: str) -> list[Doc]:
    """A letter benchmark's CSV: with a header naming question/A..D/answer columns (C-Eval, CMMLU,
    MMLU's Hugging Face copy with choice0..3 and an index), or MMLU's headerless original."""
    rows = csv_rows(path)
    if not rows:
        raise DataError(f"{path}: empty file; expected a CSV of questions, four choices and the answer")
    header = [cell.strip().lower() for cell in rows[0][1]]
    if "question" in header:
        q = header.index("question")
        if all(letter.lower() in header for letter in LETTERS):
            options = [header.index(letter.lower()) for letter in LETTERS]
        elif all(f"choice{i}" in header for i in range(4)):
            options = [header.index(f"choice{i}") for i in range(4)]
        else:
            raise DataError(f"{path}:1: the header has no A,B,C,D (or choice0..choice3) columns: {rows[0][1]}")
        if "answer" not in header:
            raise DataError(f"{path}:1: the header has no answer column: {rows[0][1]}")
        answer, rows = header.index("answer"), rows[1:]
    else:  # MMLU as its authors ship it: question, A, B, C, D, answer letter
        q, options, answer = 0, [1, 2, 3, 4], 5
    width = len(header) if "question" in header else 6
    docs = []
    for line, cells in rows:
        if len(cells) != width:
            raise DataError(
                f"{path}:{line}: {len(cells)} columns where the file has {width}; expected a question, four "
                "choices and the answer in every row"
            )
        gold = cells[answer].strip()
        index = LETTERS.index(gold) if gold in LETTERS else int(gold) if gold.isdigit() else -1
        if not 0 <= index < 4:
            raise DataError(f"{path}:{line}: answer {gold!r}: expected one of A, B, C, D (or 0-3)")
        text = letter_text(cells[q], [cells[i] for i in options], answer_cue)
        docs.append(Doc(text, [f"{letter}" for letter in LETTERS], index, subject, LETTERS[index]))
    return docs


def subject_files(folder: Path, suffix: str) -> dict[str, Path]:
    """{subject: file} for the files of ``folder`` named ``<subject><suffix>``."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (expected the benchmark's files in their published layout)")
    found = {p.name[: -len(suffix)]: p for p in sorted(folder.iterdir()) if p.name.endswith(suffix)}
    if not found:
        raise DataError(f"{folder}: no *{suffix} files")
    return found


def letter_benchmark(name: str, root: Path, test: str, suffix_of, describe, answer_cue: str) -> Benchmark:
    tests = subject_files(root / test, suffix_of(test))
    devs = subject_files(root / "dev", suffix_of("dev")) if (root / "dev").is_dir() else {}
    docs, fewshot, descriptions = [], {}, {}
    for subject, path in tests.items():
        docs += letter_docs(path, subject, answer_cue)
        fewshot[subject] = letter_docs(devs[subject], subject, answer_cue) if subject in devs else []
        descriptions[subject] = describe(subject)
    return Benchmark(name, docs, fewshot, descriptions)


def chinese_subject(task: str, subject: str) -> str:
    return SUBJECTS[task].get(subject, subject.replace("_", " "))


def mmlu(root: Path) -> Benchmark:
    def describe(subject):
        return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"

    return letter_benchmark("mmlu", root, "test", lambda split: f"_{split}.csv", describe, "Answer:")


def cmmlu(root: Path) -> Benchmark:
    def describe(subject):
        return f"以下是关于{chinese_subject('cmmlu', subject)}的单项选择题，请直接给出正确答案的选项。\n\n"

    return letter_benchmark("cmmlu", root, "test", lambda split: ".csv", describe, "答案：")


def ceval(root: Path) -> Benchmark:
    def describe(subject):
        return f"以下是中国关于{chinese_subject('ceval', subject)}的单项选择题，请选出其中的正确答案。\n\n"

    return letter_benchmark("ceval", root, "val", lambda split: f"_{split}.csv", describe, "答案：")


# -- JSON-lines benchmarks ------------------------------------------------------------------------


def jsonl_docs(path: Path, convert) -> list[Doc]:
    docs = []
    for where, record in iter_records(path, types=(".jsonl", ".json")):
        if isinstance(record, DataError):
            raise record
        try:
            docs.append(convert(record))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise DataError(f"{where}: {e.args[0] if isinstance(e, KeyError) else e}") from None
    if not docs:
        raise DataError(f"{path}: no items")
    return docs


def field_of(record: dict, *keys: str):
    """record[k1][k2]…, or a KeyError that names the missing field."""
    value = record
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(f"missing field {'.'.join(keys[: depth + 1])!r}")
        value = value[key]
    return value


def arc_doc(record: dict) -> Doc:
    choices = field_of(record, "question", "choices")
    labels = [str(c["label"]) for c in choices]
    key = str(field_of(record, "answerKey"))
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not one of the choice labels {labels}")
    texts = [c["text"] for c in choices]
    gold = labels.index(key)
    return Doc(f"Question: {field_of(record, 'question', 'stem')}\nAnswer:", texts, gold, answer_text=texts[gold])


def arc(root: Path, level: str) -> Benchmark:
    tests = sorted(root.rglob(f"ARC-{level}-Test.jsonl"))
    if not tests:
        raise DataError(f"{root}: no ARC-{level}-Test.jsonl (AI2's ARC-V1 files)")
    trains = sorted(root.rglob(f"ARC-{level}-Train.jsonl"))
    pool = jsonl_docs(trains[0], arc_doc) if trains else []
    name = f"arc_{level.lower()}"
    return Benchmark(name, jsonl_docs(tests[0], arc_doc), {"": pool}, {"": ""}, sampler="random")


def hellaswag_clean(text: str) -> str:
    """HellaSwag's text as the harness cleans it: WikiHow's [title] marks become sentence breaks,
    other bracketed marks go, double spaces become one."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_doc(record: dict) -> Doc:
    ctx = f"{field_of(record, 'ctx_a')} {str(field_of(record, 'ctx_b')).capitalize()}"
    endings = [hellaswag_clean(e) for e in field_of(record, "endings")]
    gold = int(field_of(record, "label"))
    if not 0 <= gold < len(endings):
        raise ValueError(f"label {gold} is out of range for {len(endings)} endings")
    return Doc(
        hellaswag_clean(f"{field_of(record, 'activity_label')}: {ctx}"), endings, gold, answer_text=endings[gold]
    )


def hellaswag(root: Path) -> Benchmark:
    test, train = root / "hellaswag_val.jsonl", root / "hellaswag_train.jsonl"
    if not test.is_file():
        raise DataError(f"{test}: no such file (the authors' hellaswag_val.jsonl)")
    pool = jsonl_docs(train, hellaswag_doc) if train.is_file() else []
    return Benchmark("hellaswag", jsonl_docs(test, hellaswag_doc), {"": pool}, {"": ""}, sampler="random")


def gsm8k_doc(record: dict) -> Doc:
    answer = str(field_of(record, "answer"))
    if "####" not in answer:
        raise ValueError("the answer has no '#### <number>' line")
    return Doc(f"Question: {field_of(record, 'question')}\nAnswer:", [], answer, answer_text=answer)


def gsm8k(root: Path) -> Benchmark:
    test, train = root / "test.jsonl", root / "train.jsonl"
    if not test.is_file():
        raise DataError(f"{test}: no such file (grade-school-math's test.jsonl)")
    pool = jsonl_docs(train, gsm8k_doc) if train.is_file() else []
    return Benchmark("gsm8k", jsonl_docs(test, gsm8k_doc), {"": pool}, {"": ""}, kind="generate", sampler="random")


READERS = {
    "mmlu": mmlu,
    "cmmlu": cmmlu,
    "ceval": ceval,
    "arc_challenge": lambda root: arc(root, "Challenge"),
    "arc_easy": lambda root: arc(root, "Easy"),
    "hellaswag": hellaswag,
    "gsm8k": gsm8k,
}
FOLDERS = {"arc_challenge": "arc", "arc_easy": "arc"}  # tasks that share a folder


def load_benchmark(task: str, data_dir: str | Path | None) -> Benchmark:
    """``task``'s items from ``data_dir/<task>/`` (ARC from ``data_dir/arc/``), else from the Hub."""
    if data_dir is None:
        return from_hub(task)
    return READERS[task](Path(data_dir) / FOLDERS.get(task, task))


# -- the Hub, through the datasets library ---------------------------------------------------------


def from_hub(task: str) -> Benchmark:
    """The same items through ``datasets.load_dataset`` (its cache, or the network), each row put in
    the shape of the published files so the same readers make the docs."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{task}: no --data-dir given and the datasets library is not installed; pass --data-dir DIR with "
            f"DIR/{FOLDERS.get(task, task)}/ in the benchmark's published layout, or pip install datasets"
        ) from None
    path, test_split, shot_split = HUB[task]
    configs = sorted(SUBJECTS[task]) if task in SUBJECTS else [None]
    if task == "mmlu":
        configs = datasets.get_dataset_config_names(path)
        configs = [c for c in configs if c not in ("all", "auxiliary_train")]
    elif task.startswith("arc_"):
        configs = ["ARC-Challenge" if task == "arc_challenge" else "ARC-Easy"]
    elif task == "gsm8k":
        configs = ["main"]
    docs, fewshot, descriptions = [], {}, {}
    reader = READERS[task]
    for config in configs:
        try:
            loaded = datasets.load_dataset(path, config)
        except Exception as e:  # the library raises many kinds: offline, missing, gated
            raise DataError(f"{task}: could not load {path} ({config}) through datasets: {e}") from None
        subject = config if task in ("mmlu", "cmmlu", "ceval") else ""
        benchmark = reader(hub_layout(task, subject, loaded, test_split, shot_split))
        docs += benchmark.docs
        fewshot.update(benchmark.fewshot)
        descriptions.update(benchmark.descriptions)
    sampler = "first_n" if task in ("mmlu", "cmmlu", "ceval") else "random"
    kind = "generate" if task == "gsm8k" else "multiple_choice"
    return Benchmark(task, docs, fewshot, descriptions, kind, sampler)


def hub_layout(task: str, subject: str, loaded, test_split: str, shot_split: str) -> Path:
    """Write a loaded dataset's two splits as the published files in a temporary folder; return it."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix=f"tinylm-{task}-"))
    splits = {test_split: loaded[test_split]}
    if shot_split in loaded:
        splits[shot_split] = loaded[shot_split]
    for split, rows in splits.items():
        rows = [dict(r) for r in rows]
        if task in ("mmlu", "cmmlu", "ceval"):
            folder = root / split
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{subject}.csv" if task == "cmmlu" else f"{subject}_{split}.csv"
            with open(folder / name, "w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f)
                if task == "mmlu":
                    writer.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
                    writer.writerows([r["question"], *r["choices"], r["answer"]] for r in rows)
                else:
                    q, a = ("Question", "Answer") if task == "cmmlu" else ("question", "answer")
                    writer.writerow([q, "A", "B", "C", "D", a])
                    writer.writerows([r[q], r["A"], r["B"], r["C"], r["D"], r[a]] for r in rows)
        else:
            level = "Challenge" if task == "arc_challenge" else "Easy"
            names = {
                "arc_challenge": f"ARC-{level}-{split.capitalize()}.jsonl",
                "arc_easy": f"ARC-{level}-{split.capitalize()}.jsonl",
                "hellaswag": f"hellaswag_{'val' if split == 'validation' else split}.jsonl",
                "gsm8k": f"{split}.jsonl",
            }
            lines = [json.dumps(hub_row(task, r), ensure_ascii=False) for r in rows]
            (root / names[task]).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return root


def hub_row(task: str, row: dict) -> dict:
    """A Hub row in the authors' JSON shape (ARC's Hub copy flattens the question's choices)."""
    if task.startswith("arc_"):
        choices = [{"text": t, "label": label} for t, label in zip(row["choices"]["text"], row["choices"]["label"])]
        return {"question": {"stem": row["question"], "choices": choices}, "answerKey": row["answerKey"]}
    return row

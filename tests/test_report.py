"""tinylm report: a run's stages on one self-contained HTML page (and in markdown), with loss curves,
settings, summaries, evaluations and a quickstart's tables and samples."""

import json
import re
import shutil

import pytest
from conftest import TRAIN

from tinylm.cli import main
from tinylm.eval.report import gather, write_report
from tinylm.eval.report_page import nice_ticks


def assert_self_contained(html: str) -> None:
    """Nothing for the browser to fetch: no scripts, stylesheets, images or links to anywhere."""
    assert "http:" not in html and "https:" not in html and "//" not in re.sub(r"<pre>.*?</pre>", "", html, flags=re.S)
    assert not re.search(r"<(script|link|img|iframe|object)\b", html) and not re.search(r"\b(src|href)=", html)


def test_a_run_with_a_nested_stage_and_an_evaluation(base_and_chats, tmp_path, capsys):
    _, base, chats = base_and_chats
    run = tmp_path / "run"
    shutil.copytree(base.parent, run)  # the fixture's pretraining run, copied: it stays as it was
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 21, "loss": 1.2')  # a line cut short by a crash: skipped
    sft = ["--init", str(run / "final"), "--data", str(chats), *TRAIN, "--train.max_steps=4", "--train.eval_every=2"]
    assert main(["sft", *sft, "--out", str(run / "sft")]) == 0
    results = {"model": "sft/final", "tasks": {"arc_easy": {"acc": 0.5, "acc_norm": 0.25, "items": 4, "chance": 0.25}}}
    (run / "sft" / "eval").mkdir()
    (run / "sft" / "eval" / "results.json").write_text(json.dumps(results), encoding="utf-8")
    capsys.readouterr()

    assert main(["report", str(run)]) == 0
    html_path, md_path = (run / "report" / "report.html"), (run / "report" / "report.md")
    assert capsys.readouterr().out.split() == [str(html_path), str(md_path)]
    html = html_path.read_text(encoding="utf-8")
    assert_self_contained(html)
    assert html.count("<svg") == 2 and html.count("<polyline") == 4  # each stage: training and validation loss
    assert "Stage run: pretraining" in html and "Stage sft: supervised fine-tuning" in html
    assert html.index("Stage run:") < html.index("Stage sft:")  # in the order they ran
    assert "<td>optimizer steps</td><td>20</td>" in html and "<td>optimizer steps</td><td>4</td>" in html
    assert "tokens/s" in html and "final validation loss" in html and "<summary>config.yaml</summary>" in html
    section = html[html.index("Stage sft:") :]  # the evaluation found in sft/eval/ belongs to that stage
    assert "tinylm eval of sft/final (sft/eval/results.json)" in section
    assert "<td>arc_easy</td><td>acc</td><td>50.0%</td><td>4</td><td>25.0%</td>" in section

    markdown = md_path.read_text(encoding="utf-8")
    assert "| run | pretraining | 20 |" in markdown and "| sft | supervised fine-tuning | 4 |" in markdown
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert links == ["../loss.png", "../sft/loss.png"] and all((md_path.parent / link).is_file() for link in links)

    report = gather(run)
    assert [s.curve("loss")[-1][0] for s in report.stages] == [20, 4]  # the cut-short line left out


def quickstart_report() -> dict:
    """report.json as tinylm quickstart writes it (its numbers made up)."""
    facts = {"accuracy": 0.75, "correct": 3, "total": 4, "by_kind": {"fact/en": 1.0, "fact/zh": 0.5}}
    facts["examples"] = [{"prompt": "哒丁兽的家在", "answer": "蓟花村", "completion": "蓟花村。", "correct": True}]
    questions = {"accuracy": 0.5, "correct": 2, "total": 4, "by_kind": {"fact/en": 0.5}}
    return {
        "run_dir": "runs/quickstart",
        "model": {"type": "llama", "parameters": 954880},
        "training": {"steps": 2, "tokens": 256, "seconds": 1.5},
        "validation": {"loss": 0.37, "bpb": 0.17, "unigram_bpb": 2.54},
        "facts": facts,
        "samples": [{"prompt": "Once upon a time", "text": " a <script>alert(1)</script> & a\nnew line"}],
        "pretraining_seconds": 2.0,
        "sft": {
            "steps": 2,
            "tokens": 128,
            "seconds": 1.0,
            "val_loss": 0.05,
            "questions": {"chat": {**questions, "examples": []}, "base": {**questions, "accuracy": 0.25}},
            "chat": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "<|im_end|>"}],
        },
        "total_seconds": 4.0,
    }


def test_a_quickstarts_tables_and_samples_escaped(tmp_path):
    run = tmp_path / "quickstart"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  hidden_size: 32\ndata:\n  source: builtin\n  builtin_seed: 2\n")
    lines = [{"step": 1, "loss": 6.0, "tokens": 128, "elapsed_s": 0.5}, {"step": 2, "loss": 5.0, "tokens": 256}]
    lines.append({"step": 2, "val_loss": 5.5, "mmlu/acc": 0.25})  # a benchmark run at the evaluation (eval.tasks)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run / "report.json").write_text(json.dumps(quickstart_report(), ensure_ascii=False), encoding="utf-8")
    (run / "heldout.json").write_text('{"accuracy": 0.5}')  # not the layout tinylm writes

    html_path, md_path = write_report(run, tmp_path / "elsewhere")
    html = html_path.read_text(encoding="utf-8")
    assert_self_contained(html)
    assert html.count("<svg") == 1 and html.count("<polyline") == 2
    assert "<td>final mmlu/acc (eval.tasks)</td><td>25.0%</td>" in html
    assert "heldout.json: left out" in html and "KeyError" in html
    assert "<td>tinylm built-in world (seed 2)</td>" in html and "<td>a new model</td>" in html
    assert "<td>held-out facts completed (greedy)</td><td>3/4 = 75.0%</td>" in html
    assert "<td>all</td><td>50.0%</td><td>25.0%</td><td>4</td>" in html  # chat model vs the pretrained one
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; a\nnew line" in html and "&lt;|im_end|&gt;" in html
    assert "哒丁兽的家在" in html and "<td>the whole quickstart</td><td>4 s</td>" in html
    markdown = md_path.read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; a<br>new line" in markdown and "loss.png" not in markdown
    assert not (run / "report").exists()  # --out elsewhere: nothing written into the run


def test_a_folder_without_a_run_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for folder, says in (
        (tmp_path / "empty", "no training run in it"),
        (tmp_path / "nowhere", "no such run directory"),
    ):
        assert main(["report", str(folder)]) == 2
        err = capsys.readouterr().err
        assert f"{folder}: {says}" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_axis_ticks_are_round_numbers_around_the_data():
    assert nice_ticks(0.3, 6.2) == [0, 2, 4, 6, 8]
    assert nice_ticks(0.041, 0.052) == pytest.approx([0.04, 0.045, 0.05, 0.055])
    assert nice_ticks(5, 5) == [4.5, 5.0, 5.5]  # one value: a unit around it

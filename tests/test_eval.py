"""tinylm eval: benchmark files read in their published layouts, prompts exactly as the harness writes
them, log-likelihoods equal to transformers' computed directly, and the outputs people read."""

import json
import math
import sys
import types

import pytest
import torch
from conftest import MMLU_ROWS, tiny_chat_dir, write_benchmarks, write_csv, write_jsonl

from tinylm.eval import benchmarks, harness, tasks
from tinylm.eval.loglik import Request, Scorer, encode_pair, naive_scores
from tinylm.infer.engine import Engine
from tinylm.io import DataError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_dir(tmp_path_factory.mktemp("eval") / "model", max_len=128)


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.from_dir(model_dir, device="cpu")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Every benchmark in its published layout, a few items each."""
    return write_benchmarks(tmp_path_factory.mktemp("benchmarks"))


# -- prompts, as lm-evaluation-harness writes them --------------------------------------------------


def test_mmlu_prompt_is_the_harness_default(data_dir):
    bench = benchmarks.load_benchmark("mmlu", data_dir)
    assert len(bench.docs) == 6 and bench.docs[0].gold == 1 and bench.docs[0].choices == ["A", "B", "C", "D"]
    shots = tasks.fewshot_examples(bench, 1)
    assert tasks.plain_prompt(bench, bench.docs[1], shots[1]) == (
        "The following are multiple choice questions (with answers) about high school math.\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
        "Which is a colour?\nA. red\nB. seven\nC. dog\nD. run\nAnswer:"
    )
    # the other subject's examples come from its own dev file, first ones first
    assert shots[3][0].text.startswith("Pick the last letter.")


def test_hf_copy_of_mmlu_with_header_and_index_answers(tmp_path):
    rows = [[r[0], *r[1:5], "ABCD".index(r[5])] for r in MMLU_ROWS]
    write_csv(
        tmp_path / "mmlu" / "test" / "anatomy_test.csv",
        rows,
        ["question", "choice0", "choice1", "choice2", "choice3", "answer"],
    )
    bench = benchmarks.load_benchmark("mmlu", tmp_path)
    assert [d.gold for d in bench.docs] == [1, 0, 3]
    assert bench.descriptions["anatomy"].startswith(
        "The following are multiple choice questions (with answers) about anatomy."
    )


def test_chinese_benchmarks_use_their_subject_names(data_dir):
    cm = benchmarks.load_benchmark("cmmlu", data_dir)
    ce = benchmarks.load_benchmark("ceval", data_dir)
    assert tasks.plain_prompt(cm, cm.docs[0], []) == (
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n2 加 2 等于几？\nA. 3\nB. 4\nC. 5\nD. 6\n答案："
    )
    assert ce.descriptions["accountant"] == "以下是中国关于注册会计师的单项选择题，请选出其中的正确答案。\n\n"
    assert [d.gold for d in ce.docs] == [1, 0]


def test_arc_and_hellaswag_choices(data_dir):
    arc = benchmarks.load_benchmark("arc_challenge", data_dir)
    assert arc.docs[0].text == "Question: Which is hot?\nAnswer:" and arc.docs[0].choices == ["ice", "the sun", "snow"]
    assert arc.docs[1].gold == 0 and len(arc.docs[1].choices) == 2  # numeric labels, two choices
    swag = benchmarks.load_benchmark("hellaswag", data_dir)
    assert swag.docs[0].text == "Cooking: A man cuts bread. He"
    assert swag.docs[0].choices[0] == "eats it. slowly."  # [title] becomes a sentence break, as the harness cleans it
    assert swag.docs[1].gold == 0


def test_fewshot_random_sampler_is_seeded_per_item(data_dir):
    bench = benchmarks.load_benchmark("gsm8k", data_dir)
    first, again = tasks.fewshot_examples(bench, 2), tasks.fewshot_examples(bench, 2)
    assert [[d.text for d in ex] for ex in first] == [[d.text for d in ex] for ex in again]
    prompt = tasks.plain_prompt(bench, bench.docs[0], first[0])
    assert prompt.endswith("\n\nQuestion: Tom has 2 apples and buys 3. How many?\nAnswer:")
    assert prompt.count("####") == 2  # worked answers, chain of thought and all


def test_gsm8k_answer_extraction():
    assert tasks.strict_answer("so 5 apples\n#### 5") == "5"
    assert tasks.strict_answer("the answer is 5") == "[invalid]"
    assert tasks.flexible_answer("3 + 2 is 5, so $1,000.") == "$1,000."
    assert tasks.normalise("$1,000.") == tasks.normalise("2 + 3\n#### 1,000") == "1000"


# -- scoring ------------------------------------------------------------------------------------------


def test_shared_context_scoring_equals_one_forward_per_choice(engine):
    scorer = Scorer(engine, batch_size=3)
    contexts = ["the cat", "你好", "the dog ran. the cat sat on", "User: hi\nAssistant:"]
    continuations = [" sat", " on the mat.", " 世界，小明", " hello there and more"]
    requests = [scorer.request(c, continuations) for c in contexts]
    for request, scores in zip(requests, scorer.score(requests)):
        for got, want in zip(scores, naive_scores(engine.model, request)):
            assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
            assert got.greedy == want.greedy and got.tokens == want.tokens


def test_log_likelihoods_match_transformers(model_dir, engine, data_dir):
    """An independent implementation: transformers' model over context + continuation, summed by hand."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    bench = benchmarks.load_benchmark("arc_challenge", data_dir)
    result = tasks.multiple_choice("arc_challenge", bench, Scorer(engine), 1)
    for doc, sample, shots in zip(bench.docs, result.samples, tasks.fewshot_examples(bench, 1)):
        context = tasks.plain_prompt(bench, doc, shots)
        for choice, got in zip(doc.choices, sample["scores"]):
            ctx_ids = engine.tokenizer.encode(context)
            whole = engine.tokenizer.encode(context + " " + choice)
            with torch.no_grad():
                logits = hf(torch.tensor([whole])).logits[0].log_softmax(-1)
            want = sum(float(logits[i - 1, whole[i]]) for i in range(len(ctx_ids), len(whole)))
            assert got == pytest.approx(want, abs=1e-4)
        assert sample["pred"] == max(range(len(doc.choices)), key=lambda i: sample["scores"][i])


def test_whitespace_moves_to_the_continuation(engine):
    tokenizer = engine.tokenizer
    context, continuation = encode_pair(tokenizer, "the cat ", "sat")
    assert tokenizer.decode(context) == "the cat" and tokenizer.decode(continuation) == " sat"


def test_long_context_keeps_its_last_tokens_per_choice(engine):
    """A context too long for the model is cut from the left for each choice, as the harness cuts each
    (context, continuation) pair: the last 128 + 1 - len(choice) tokens."""
    scorer = Scorer(engine, batch_size=2)
    context = [1 + i % 250 for i in range(200)]
    request = Request(context, [[5, 6], [7], [8, 9, 10]])
    parts = scorer.fit(request)
    assert [len(p.context) for p in parts] == [127, 128, 126]
    short = Request(context[:50], [[5, 6], [7]])
    assert scorer.fit(short) == [short]  # fits whole: one shared context
    got = scorer.score([short, request])
    want = [s for part in parts for s in naive_scores(engine.model, part)]
    assert [s.logprob for s in got[1]] == pytest.approx([s.logprob for s in want], abs=1e-4)
    assert [s.tokens for s in got[1]] == [2, 1, 3]


def test_rolling_perplexity_equals_direct_sum(engine):
    ids = engine.tokenizer.encode("the cat sat on the mat. the dog ran. " * 12)
    assert len(ids) > engine.context_length  # two windows
    prefix = [engine.tokenizer.eos_id]
    with torch.no_grad():
        total = 0.0
        for start in range(0, len(ids), 128):
            context = prefix if start == 0 else ids[start - 1 : start]
            window = ids[start : start + 128]
            total += naive_scores(engine.model, Request(context, [window]))[0].logprob
    assert Scorer(engine).rolling(ids) == pytest.approx(total, abs=1e-3)


# -- the command and its outputs ---------------------------------------------------------------------


def test_eval_command_writes_results_and_samples(model_dir, data_dir, tmp_path, capsys):
    from tinylm.cli import main

    text = tmp_path / "doc.txt"
    text.write_text("the cat sat on the mat.\n\n你好 世界", encoding="utf-8")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hi\n你好\n", encoding="utf-8")
    out = tmp_path / "out"
    names = f"mmlu,ceval,arc_challenge,hellaswag,gsm8k,ppl:{text},prompts:{prompts}"
    flags = ["--data-dir", str(data_dir), "--shots", "1", "--max-new-tokens", "8", "--out", str(out), "--device", "cpu"]
    code = main(["eval", str(model_dir), "--tasks", names, *flags])
    assert code == 0
    results = json.loads((out / "results.json").read_text())["tasks"]
    assert results["mmlu"]["items"] == 6 and results["mmlu"]["shots"] == 1 and results["mmlu"]["chance"] == 0.25
    assert 0 <= results["mmlu"]["acc"] <= 1 and set(results["mmlu"]["subjects"]) == {
        "high_school_math",
        "world_religions",
    }
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(results["gsm8k"])
    ppl = results[f"ppl:{text}"]
    assert ppl["bits_per_byte"] == pytest.approx(math.log2(ppl["byte_perplexity"]))
    samples = [json.loads(line) for line in (out / "samples_mmlu.jsonl").read_text().splitlines()]
    assert {"doc_id", "target", "pred", "scores"} <= set(samples[0]) and len(samples[0]["scores"]) == 4
    assert samples[0]["pred"] == max(range(4), key=lambda i: samples[0]["scores"][i])
    assert (out / "samples_ppl_doc.jsonl").is_file() and "## 2. 你好" in (out / "prompts_prompts.md").read_text()
    table = (out / "results.md").read_text()
    assert "| mmlu | 1 | acc |" in table and "| 25.0% | 6 |" in table
    assert "| mmlu | 1 | acc |" in capsys.readouterr().out


def test_results_go_into_the_model_card(model_dir, data_dir, tmp_path):
    import shutil

    from tinylm.cli import main

    copy = shutil.copytree(model_dir, tmp_path / "model")
    assert "## Evaluation" not in (copy / "README.md").read_text()
    flags = ["--data-dir", str(data_dir), "--device", "cpu", "--card"]
    assert main(["eval", str(copy), "--tasks", "arc_challenge,hellaswag", *flags]) == 0
    card = (copy / "README.md").read_text()
    assert "## Evaluation" in card and "arc_challenge" in card and "hellaswag" in card
    assert "tinylm eval --tasks arc_challenge,hellaswag" in card


def test_chat_prompts_go_through_the_template(engine, data_dir):
    from tinylm.infer.chat import chat_format_for

    bench = benchmarks.load_benchmark("cmmlu", data_dir)
    chat_format = chat_format_for(engine.tokenizer, engine.model.config.eos_token_ids())
    prompt = tasks.prompt_for(bench, bench.docs[0], [], chat_format)
    assert prompt.startswith("<|im_start|>system\n以下是关于农学") and prompt.endswith(
        "答案：<|im_end|>\n<|im_start|>assistant\n"
    )


def test_limit_counts_per_subject(data_dir):
    bench = harness.limited(benchmarks.load_benchmark("mmlu", data_dir), 1)
    assert [d.subject for d in bench.docs] == ["high_school_math", "world_religions"]


def test_task_list_parsing():
    assert harness.split_tasks("ppl:a.txt,b.txt,mmlu,prompts:p.txt") == ["ppl:a.txt,b.txt", "mmlu", "prompts:p.txt"]
    with pytest.raises(DataError, match="unknown task 'mmlux'"):
        harness.task_names("mmlux")


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, message",
    [
        ([["What?", "a", "b", "c", "d", "E"]], r"_test.csv:1: answer 'E': expected one of A, B, C, D"),
        ([["What?", "a", "b", "c", "B"]], r"_test.csv:1: 5 columns where the file has 6"),
        ([["What?", "a", "b", "c", "d", "A"], ["Why?", "a", "b", "c", "d", "e", "A"]], r"_test.csv:2: 7 columns"),
    ],
)
def test_bad_benchmark_rows_name_file_and_row(tmp_path, rows, message):
    write_csv(tmp_path / "mmlu" / "test" / "anatomy_test.csv", rows)
    with pytest.raises(DataError, match=message):
        benchmarks.load_benchmark("mmlu", tmp_path)


def test_missing_column_is_named(tmp_path):
    write_csv(
        tmp_path / "ceval" / "val" / "law_val.csv",
        [[0, "q", "a", "b", "c", "d"]],
        ["id", "question", "A", "B", "C", "D"],
    )
    with pytest.raises(DataError, match=r"law_val.csv:1: the header has no answer column"):
        benchmarks.load_benchmark("ceval", tmp_path)


def test_bad_json_items_name_the_line(tmp_path):
    write_jsonl(
        tmp_path / "arc" / "ARC-Challenge-Test.jsonl",
        [{"question": {"stem": "q", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "C"}],
    )
    with pytest.raises(DataError, match=r"ARC-Challenge-Test.jsonl:1: answerKey 'C' is not one of the choice labels"):
        benchmarks.load_benchmark("arc_challenge", tmp_path)
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "q"}])
    with pytest.raises(DataError, match=r"test.jsonl:1: missing field 'answer'"):
        benchmarks.load_benchmark("gsm8k", tmp_path)


def test_prompts_file_not_utf8_is_named(engine, tmp_path):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"hello\n\xff\xfe oops\n")
    with pytest.raises(DataError, match=r"prompts\.txt"):
        harness.evaluate(engine, f"prompts:{bad}", progress=False)


def test_too_few_fewshot_examples(data_dir):
    bench = benchmarks.load_benchmark("ceval", data_dir)
    with pytest.raises(
        DataError, match="ceval: 7-shot needs 7 few-shot examples of accountant, the few-shot split has 6"
    ):
        tasks.fewshot_examples(bench, 7)


def test_no_data_dir_and_no_datasets_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="no --data-dir given and the datasets library is not installed"):
        benchmarks.load_benchmark("mmlu", None)


def test_hub_rows_become_the_same_items(monkeypatch, data_dir):
    """Through the datasets library: rows in the Hub's shapes give the items the files give."""
    arc_rows = [
        json.loads(line)
        for line in (data_dir / "arc" / "ARC-Challenge" / "ARC-Challenge-Test.jsonl").read_text().splitlines()
    ]
    hub_arc = []
    for r in arc_rows:  # the Hub's copy flattens the question and gives choices as two lists
        choices = r["question"]["choices"]
        texts, labels = [c["text"] for c in choices], [c["label"] for c in choices]
        hub_arc.append(
            {
                "question": r["question"]["stem"],
                "choices": {"text": texts, "label": labels},
                "answerKey": r["answerKey"],
            }
        )
    mmlu = [{"question": r[0], "choices": r[1:5], "answer": "ABCD".index(r[5])} for r in MMLU_ROWS]

    def load_dataset(path, config):
        if path == "allenai/ai2_arc":
            assert config == "ARC-Challenge"
            return {"test": hub_arc, "train": hub_arc}
        assert path == "cais/mmlu"
        return {"test": mmlu, "dev": mmlu}

    fake = types.SimpleNamespace(load_dataset=load_dataset, get_dataset_config_names=lambda path: ["all", "anatomy"])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    hub = benchmarks.load_benchmark("arc_challenge", None)
    files = benchmarks.load_benchmark("arc_challenge", data_dir)
    assert [(d.text, d.choices, d.gold) for d in hub.docs] == [(d.text, d.choices, d.gold) for d in files.docs]
    from_hub = benchmarks.load_benchmark("mmlu", None)
    assert [d.gold for d in from_hub.docs] == [1, 0, 3] and "anatomy" in from_hub.descriptions["anatomy"]


def test_real_mmlu_and_cmmlu_files(shared_data, engine):
    """The real files, as distributed (a few items per subject)."""
    root = shared_data / "eval"
    results = harness.evaluate(engine, "mmlu,cmmlu,ceval,arc_challenge", data_dir=root, limit=1, progress=False)
    assert results["tasks"]["mmlu"]["items"] == 57 and results["tasks"]["cmmlu"]["items"] == 67
    assert results["tasks"]["ceval"]["items"] == 52 and results["tasks"]["arc_challenge"]["items"] == 1

"""DPO on the real preference files of ../shared/data/dpo, through the CLI: each format loads and,
over a few steps, the reward margin between chosen and rejected answers grows.

The model is tiny (hidden 32, a 1,000-token tokenizer), pretrained for 20 steps on the files' own text
and given the chatml template by ``--template``; so the runs take seconds and show the pipeline works
end to end on real data, not that the model learned anything worth having.
"""

import gzip
import json
import math

import pytest
from conftest import read_metrics

from tinylm.cli import main
from tinylm.data.preference import read_preferences

pytestmark = pytest.mark.realdata

TINY_MODEL = [
    "--model.hidden_size=32",
    "--model.num_hidden_layers=2",
    "--model.num_attention_heads=2",
    "--model.num_key_value_heads=1",
    "--data.vocab_size=1000",
]
TRAIN = [
    "--train.seq_len=512",
    "--train.batch_size=4",
    "--train.progress=false",
    "--train.warmup_steps=2",
    "--train.save_every=0",
]
# file → (the format it must be read as, extra arguments)
CASES = {
    "llamafactory_dpo_en_demo.json": ("llamafactory", []),
    "llamafactory_dpo_zh_demo.json": ("llamafactory", []),
    "medicalgpt_dpo_zh_500.jsonl": ("llamafactory", []),
    "hh-rlhf_harmless-base_test.jsonl.gz": ("hh-rlhf", ["--skip-bad"]),  # 13 of 2,312 transcripts are malformed
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"realdata: {SHARED_DATA} is absent")
    root = tmp_path_factory.mktemp("dpo-real")
    text = root / "text.jsonl"
    with open(text, "w", encoding="utf-8") as f:
        for name in CASES:
            pairs, _ = read_preferences(SHARED_DATA / "dpo" / name, skip_bad=True)
            for pair in pairs[:300]:
                document = "\n".join([*(m["content"] for m in pair.prompt), pair.chosen, pair.rejected])
                f.write(json.dumps({"text": document}, ensure_ascii=False) + "\n")
    assert (
        main(
            [
                "pretrain",
                "--out",
                str(root / "base"),
                *TINY_MODEL,
                *TRAIN,
                "--train.max_steps=20",
                "--data.source=files",
                f"--data.files=[{text}]",
            ]
        )
        == 0
    )
    return SHARED_DATA / "dpo", root / "base" / "final"


def first_records(path, count: int, out_dir):
    """The first ``count`` records of a file, in a file of the same format (so the reader sees the real
    thing), small enough that a few steps go over each pair several times."""
    out = out_dir / path.name
    if path.name.endswith(".json"):
        out.write_text(
            json.dumps(json.loads(path.read_text(encoding="utf-8"))[:count], ensure_ascii=False), encoding="utf-8"
        )
    else:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f, opener(out, "wt", encoding="utf-8") as g:
            g.writelines(line for _, line in zip(range(count), f))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_dpo_on_real_pairs_grows_the_margin(base, name, tmp_path, capsys):
    data, model = base
    fmt, extra = CASES[name]
    run = tmp_path / "dpo"
    assert (
        len(read_preferences(data / name, skip_bad=True)[0]) >= 300
    )  # every record of the whole file loads (or is counted)
    capsys.readouterr()
    assert (
        main(
            [
                "dpo",
                "--init",
                str(model),
                "--template",
                "chatml",
                "--data",
                str(first_records(data / name, 40, tmp_path)),
                "--out",
                str(run),
                *TRAIN,
                *extra,
                "--train.max_steps=24",
                "--train.lr=0.002",
                "--train.log_every=8",
                "--train.eval_every=24",
                "--data.val_fraction=0.05",
                "--dpo.sft_weight=0",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert f"read {fmt} " in err, err
    logged = read_metrics(run)
    margins = [r["margin"] for r in logged if "margin" in r]
    assert margins[-1] > margins[0] and margins[-1] > 0, margins
    # the held-out pairs were scored before training, where the policy is its own reference (every reward
    # 0, the loss log 2), and after it: the report's "after" is the last evaluation the run logged, at step 24
    report = json.loads((run / "dpo.json").read_text())
    before, after = report["before"], report["after"]
    assert before["val_loss"] == pytest.approx(math.log(2)), before
    assert before["val_margin"] == pytest.approx(0, abs=1e-6), before
    (last,) = [r for r in logged if "val_loss" in r]
    assert last["step"] == 24 and after == {k: v for k, v in last.items() if k != "step"} and after != before
    assert (run / "final" / "model.safetensors").exists()

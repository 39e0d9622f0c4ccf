"""The reward model: the model and its pooling, the Bradley-Terry loss, `tinylm rm` end to end (full,
LoRA, QLoRA), its directory in transformers' layout with the same scores (Llama and Qwen2), and the
errors a user can make."""

import json
import math
import random
import re

import pytest
import torch
from conftest import NAMES, TRAIN, read_metrics, tiny_chat_dir, tiny_qwen2_dir

from tinylm.chat_template import get_template
from tinylm.cli import main
from tinylm.model.llama import CausalLM, ModelConfig
from tinylm.model.reward import RewardModel
from tinylm.modeldir import ModelDirError, is_reward_dir, load, load_model_dir, load_reward_dir, save_model_dir
from tinylm.tokenizer import Tokenizer
from tinylm.train.objectives import BradleyTerryLoss
from tinylm.train.rm import reward_pad_id, score_conversations

CONVERSATIONS = [  # different lengths, so a batch of them is padded
    [{"role": "user", "content": "What colour does Tom like?"}, {"role": "assistant", "content": "Tom likes red."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "小明喜欢什么颜色？"},
        {"role": "assistant", "content": "小明喜欢黄色。"},
        {"role": "user", "content": "And Ann?"},
        {"role": "assistant", "content": "Ann likes blue, I think, but ask her."},
    ],
    [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on the mat. the dog ran."}],
]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Pairs preferring the colour each person likes over a wrong one: the reward model must know the
    facts (the trained base learned them) to tell the answers apart."""
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("rm") / "pairs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(200):
            name = rng.choice(list(NAMES))
            wrong = rng.choice([c for c in NAMES.values() if c != NAMES[name]])
            record = {
                "conversations": [{"from": "human", "value": f"What colour does {name} like?"}],
                "chosen": {"from": "gpt", "value": f"{name} likes {NAMES[name]}."},
                "rejected": {"from": "gpt", "value": f"{name} likes {wrong}."},
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def rm_args(init, pairs, out, *extra):
    return [
        "rm",
        "--init",
        str(init),
        "--data",
        str(pairs),
        "--out",
        str(out),
        "--template",
        "chatml",
        *TRAIN,
        "--train.eval_batches=4",
        "--data.val_fraction=0.1",
        "--train.weight_decay=0",
        *extra,
    ]


def transformers_scores(model_dir, conversations, peft_base=None):
    """What transformers gives for ``conversations``, rendered by the saved tokenizer's chat template and
    right-padded by the tokenizer, as a user would score them: the directory as
    AutoModelForSequenceClassification, or an adapter with PEFT, over ``peft_base`` loaded as a one-label
    classifier (``peft_base="named"``: the base adapter_config.json names, as the model card loads it)."""
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    texts = [tokenizer.apply_chat_template(messages, tokenize=False) for messages in conversations]
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    assert inputs["attention_mask"].float().mean() < 1  # the batch really is padded
    if peft_base is None:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir)
    elif peft_base == "named":
        peft = pytest.importorskip("peft")
        model = peft.AutoPeftModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, pad_token_id=tokenizer.pad_token_id
        )
    else:
        peft = pytest.importorskip("peft")
        base = transformers.AutoModelForSequenceClassification.from_pretrained(
            peft_base, num_labels=1, pad_token_id=tokenizer.pad_token_id
        )
        model = peft.PeftModel.from_pretrained(base, model_dir)
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    assert logits.shape == (len(conversations), 1)
    return logits[:, 0]


def tinylm_scores(model_dir, conversations):
    loaded = load(model_dir)
    assert isinstance(loaded.model, RewardModel)
    return score_conversations(loaded.model, loaded.tokenizer, conversations, batch_size=len(conversations))


# -- the model --------------------------------------------------------------------------------------


def test_the_score_is_read_where_transformers_reads_it():
    """At each row's rightmost token that is not the pad id, whatever the padding (transformers'
    GenericForSequenceClassification rule); without a pad id, a single row's last token."""
    config = ModelConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, pad_token_id=0)
    model = RewardModel(config)
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 0, 7, 8, 9], [0, 0, 5, 6, 0], [0, 0, 0, 0, 0]])
    assert model.last_token(ids).tolist() == [2, 4, 3, 0]
    assert (model.score.weight == 0).all() and (model(ids) == 0).all()  # the head starts at zero: ties
    model.config.pad_token_id = None
    assert model.last_token(ids[:1]).tolist() == [4]
    with pytest.raises(ValueError, match="no pad_token_id"):
        model.last_token(ids)


def test_a_reward_model_shares_the_decoder_and_has_transformers_names():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    lm = CausalLM(ModelConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2))
    model = RewardModel.from_language_model(lm, pad_token_id=0)
    assert model.model is lm.model and not hasattr(model, "lm_head") and lm.config.pad_token_id is None
    config = transformers.LlamaConfig(**{**lm.config.to_hf_dict(), "num_labels": 1, "pad_token_id": 0})
    theirs = transformers.LlamaForSequenceClassification(config).state_dict()
    assert set(model.state_dict()) == set(theirs)
    assert all(model.state_dict()[k].shape == theirs[k].shape for k in theirs)


def test_bradley_terry_loss_and_its_metrics():
    rewards = torch.tensor([2.0, 0.5, 1.0, 1.0, 0.5, 3.0])  # chosen of pairs 0..2, then rejected of pairs 0..2

    def model(input_ids):
        return rewards

    objective = BradleyTerryLoss()
    batch = {"input_ids": torch.zeros(6, 4, dtype=torch.long)}
    loss = objective(model, batch)
    margins = [2.0 - 1.0, 0.5 - 0.5, 1.0 - 3.0]
    assert objective.count(batch) == 3
    assert loss.item() == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins))
    totals = objective.pop_metrics()
    assert totals["count"] == 3 and totals["accuracy"] == 1  # the tie (pair 1) counts as wrong
    assert totals["margin"] == pytest.approx(sum(margins)) and totals["rewards/chosen"] == pytest.approx(3.5)
    assert objective.pop_metrics() == {}


def test_the_pad_is_a_token_the_template_never_writes(base_and_chats):
    _, base, _ = base_and_chats
    chatml = get_template("chatml")
    ours = chatml.attach(Tokenizer.load(base))
    assert reward_pad_id(ours, chatml) == ours.eos_id == ours.token_to_id("<|endoftext|>")
    # a Qwen2.5-Instruct-like tokenizer ends documents with <|im_end|>, which ChatML writes after every turn
    qwen = Tokenizer(ours._rust, eos_token="<|im_end|>", chat_template=ours.chat_template)
    assert reward_pad_id(qwen, chatml) == qwen.token_to_id("<|endoftext|>") != qwen.eos_id


def test_a_reward_model_trains_on_the_whole_conversation(base_and_chats):
    """Its rows are the conversations as apply_chat_template renders them, unshifted: the score is read
    in training at the token transformers reads it at (after ChatML's <|im_end|>, its "\\n")."""
    from tinylm.data.preference import PreferencePair
    from tinylm.train.pairs import encode_pairs

    _, base, _ = base_and_chats
    template = get_template("chatml")
    tokenizer = template.attach(Tokenizer.load(base))
    prompt = [{"role": "user", "content": "Tom?"}]
    (pair,), _ = encode_pairs(
        [PreferencePair(prompt, "Tom likes red.", "No.", "x")], template, tokenizer, 64, for_reward_model=True
    )
    whole, _ = template.encode(tokenizer, [*prompt, {"role": "assistant", "content": "Tom likes red."}])
    assert pair.chosen.input_ids == whole and tokenizer.decode(whole).endswith("Tom likes red.<|im_end|>\n")
    assert set(pair.chosen.labels) == {-100}
    (cut,), truncated = encode_pairs(
        [PreferencePair([{"role": "user", "content": "Tom? " * 60}], "red " * 80, "No.", "f:3")],
        template,
        tokenizer,
        64,
        for_reward_model=True,
    )
    assert truncated == ["f:3"] and len(cut.chosen) == 64 and len(cut.rejected) <= 64


def test_a_reward_model_directory_round_trips(tmp_path):
    model_dir = tiny_chat_dir(tmp_path / "chat")
    lm, tokenizer = load_model_dir(model_dir)
    model = RewardModel.from_language_model(lm, pad_token_id=tokenizer.eos_id)
    torch.nn.init.normal_(model.score.weight)
    save_model_dir(model, tmp_path / "rm", tokenizer)
    assert is_reward_dir(tmp_path / "rm") and not (tmp_path / "rm" / "generation_config.json").exists()
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    assert config["id2label"] == {"0": "LABEL_0"} and config["pad_token_id"] == tokenizer.eos_id
    loaded, _ = load_reward_dir(tmp_path / "rm")
    assert not {"num_labels", "id2label", "label2id"} & loaded.config.extra.keys()  # the head's shape says it
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    card = (tmp_path / "rm" / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "- reward-model" in card
    assert "AutoModelForSequenceClassification" in card


# -- tinylm rm, end to end ----------------------------------------------------------------------------


def test_rm_learns_the_preferences_and_reports_them(trained_base, pairs_file, tmp_path, capsys):
    run = tmp_path / "rm"
    args = rm_args(trained_base, pairs_file, run, "--train.max_steps=100", "--train.lr=0.003", "--train.log_every=1")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "read llamafactory 200" in err and "pad id 0 (<|endoftext|>)" in err
    train = [r for r in read_metrics(run) if "loss" in r]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the zero head: every pair a tie
    assert {"rewards/chosen", "rewards/rejected", "margin", "accuracy"} <= train[-1].keys()
    report = json.loads((run / "rm.json").read_text())
    before, after = report["before"], report["after"]
    assert before["val_accuracy"] == 0 and before["val_loss"] == pytest.approx(math.log(2))  # ties are wrong
    # (a 32-wide model: a few pairs stay hard, such as "Bob likes blue" when Ann is the one who does)
    assert after["val_accuracy"] >= 0.75 and after["val_loss"] < 0.5 * math.log(2) and after["val_margin"] > 1
    assert "held-out pairs (20): the chosen answer scores higher in 0.0% before" in err
    card = (run / "final" / "README.md").read_text()
    assert "| held-out preference pairs | accuracy before | 0.0% | 20 |" in card


def card_snippets_agree(model_dir, capsys) -> None:
    """The model card's two ways to score its example conversation (transformers, then tinylm) run and
    print the same reward."""
    capsys.readouterr()
    for snippet in re.findall(r"```python\n(.*?)```", (model_dir / "README.md").read_text(encoding="utf-8"), re.S):
        exec(snippet, {})
    printed = [float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", capsys.readouterr().out)]
    assert len(printed) == 2 and printed[0] == pytest.approx(printed[1], abs=1e-4)


def test_a_saved_reward_model_scores_identically_in_transformers(pairs_file, tmp_path, capsys):
    """`tinylm rm`'s directory loads as AutoModelForSequenceClassification and gives the same scores for a
    right-padded batch of conversations of different lengths, rendered by the saved chat template."""
    chat = tiny_chat_dir(tmp_path / "chat", max_len=256)  # the longest conversation is 136 tokens
    run = tmp_path / "rm"
    assert main(rm_args(chat, pairs_file, run, "--train.max_steps=3", "--train.lr=0.01")) == 0
    ours = tinylm_scores(run / "final", CONVERSATIONS)
    theirs = transformers_scores(run / "final", CONVERSATIONS)
    assert ours.std() > 1e-3  # the trained head tells the conversations apart
    assert (ours - theirs).abs().max() < 1e-4
    card_snippets_agree(run / "final", capsys)


def test_a_qwen2_base_gives_a_qwen2_reward_model(base_and_chats, pairs_file, tmp_path):
    _, base, _ = base_and_chats
    qwen = tiny_qwen2_dir(tmp_path / "qwen", get_template("chatml").attach(Tokenizer.load(base)))
    run = tmp_path / "rm"
    assert main(rm_args(qwen, pairs_file, run, "--train.max_steps=3", "--train.lr=0.01")) == 0
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"] and config["model_type"] == "qwen2"
    ours, theirs = tinylm_scores(run / "final", CONVERSATIONS), transformers_scores(run / "final", CONVERSATIONS)
    assert ours.std() > 1e-3 and (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("method", [["--lora"], ["--qlora", "--lora.block_size=32"]])
def test_lora_saves_a_peft_sequence_classifier_adapter(trained_base, pairs_file, tmp_path, capsys, method):
    """The adapter on the decoder and the score head trained whole, saved in PEFT's SEQ_CLS layout:
    PEFT loads it onto AutoModelForSequenceClassification of the base, and tinylm's load and merge agree."""
    run = tmp_path / "lora"
    args = rm_args(trained_base, pairs_file, run, "--train.max_steps=30", "--train.lr=0.01", *method)
    assert main(args) == 0
    assert "(and score whole)" in capsys.readouterr().err
    final = run / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and adapter["modules_to_save"] == ["score"]
    assert not (final / "model.safetensors").exists() and is_reward_dir(final)
    report = json.loads((run / "rm.json").read_text())
    assert report["after"]["val_accuracy"] > report["before"]["val_accuracy"] + 0.5
    ours = tinylm_scores(final, CONVERSATIONS)
    assert ours.std() > 1e-3
    assert (ours - transformers_scores(final, CONVERSATIONS, peft_base=trained_base)).abs().max() < 1e-4
    assert (ours - transformers_scores(final, CONVERSATIONS, peft_base="named")).abs().max() < 1e-4
    card_snippets_agree(final, capsys)
    assert main(["merge", str(trained_base), str(final), str(tmp_path / "merged")]) == 0
    assert (tinylm_scores(tmp_path / "merged", CONVERSATIONS) - ours).abs().max() < 1e-5
    assert (transformers_scores(tmp_path / "merged", CONVERSATIONS) - ours).abs().max() < 1e-4


def test_rm_errors_name_the_problem(trained_base, base_and_chats, pairs_file, tmp_path, capsys):
    _, base, _ = base_and_chats
    assert main(["rm", "--init", str(base), "--out", str(tmp_path / "a")]) == 2  # a base model: no chat template
    assert "has no tinylm chat template" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "same"}) + "\n")
    args = ["rm", "--init", str(base), "--template", "chatml", "--data", str(empty), "--skip-bad"]
    assert main([*args, "--out", str(tmp_path / "b"), *TRAIN]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: no preference pairs to train on" in err
    run = tmp_path / "rm"
    assert main(rm_args(trained_base, pairs_file, run, "--train.max_steps=1")) == 0
    for command in (["chat", str(run / "final")], ["sft", "--init", str(run / "final"), "--out", str(tmp_path / "c")]):
        capsys.readouterr()
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a reward model" in err
    with pytest.raises(ModelDirError, match="is not a reward model"):
        load_reward_dir(trained_base)

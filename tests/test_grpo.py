"""GRPO: prompts and their files, the built-in verifiers, rewards that fail loudly, the loss, rollouts,
a tiny run whose reward rises, exact resume in the middle of a round, and the command's errors."""

import json
import math

import pytest
import torch
from conftest import read_metrics, tiny_chat_dir, write_jsonl

from tinylm.chat_template import get_template, split_thinking
from tinylm.cli import main
from tinylm.data.builtin import World
from tinylm.data.builtin_chat import heldout_questions
from tinylm.data.rl_prompts import (
    BUILTIN_KINDS,
    RLPrompt,
    builtin_prompts,
    heldout_prompts,
    read_prompts,
)
from tinylm.io import DataError
from tinylm.model.loss import IGNORE
from tinylm.modeldir import load_model_dir
from tinylm.train.grpo import GRPOConfig, Rollouts, encode_prompts
from tinylm.train.objectives import GRPOLoss
from tinylm.train.rewards import RewardError, build_reward

TINY = [
    "--train.batch_size=4",
    "--train.progress=false",
    "--train.warmup_steps=0",
    "--train.save_every=0",
    "--train.log_every=1",
    "--grpo.max_new_tokens=6",
    "--grpo.group_size=4",
]


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# -- prompts ------------------------------------------------------------------------------------------


def test_builtin_prompts_never_ask_a_heldout_question():
    world = World(0)
    prompts = builtin_prompts(world, BUILTIN_KINDS)
    heldout = heldout_prompts(world)
    asked = {tuple(m["content"] for m in p.messages) for p in prompts}
    assert not asked & {tuple(m["content"] for m in p.messages) for p in heldout}
    assert {p.kind for p in prompts} == {"arithmetic", "fact", "followup", "refusal", "identity"}
    # topic switches are evaluated, not trained on: their questions are those of the other kinds, in a conversation
    assert {p.kind for p in prompts} == {p.kind for p in heldout} - {"switch"}
    held_problems = {p.messages[-1]["content"] for p in heldout if p.kind == "arithmetic"}
    for p in prompts:
        assert p.answer and p.answer not in p.wrong and p.lang in ("en", "zh")
        if p.kind == "arithmetic":
            assert len(p.wrong) == 18 and p.messages[-1]["content"] not in held_problems
        if p.kind == "followup":
            assert [m["role"] for m in p.messages] == ["user", "assistant", "user"]
    assert len([p for p in prompts if p.kind == "arithmetic"]) == 1056
    with pytest.raises(ValueError, match="poems"):
        builtin_prompts(world, ("poems",))


def test_the_facts_reward_scores_every_builtin_kind_as_the_heldout_evaluation_does():
    from tinylm.data.builtin_chat import score_reply

    facts = build_reward("facts", None)
    for item, prompt in zip(heldout_questions(World(0)), heldout_prompts(World(0))):
        for reply in (
            item.answer,
            f"Maybe {item.answer}.",
            "I don't know.",
            "7",
            f"{item.answer} or {(item.wrong or ('x',))[0]}",
        ):
            assert facts([prompt], [reply]) == [float(score_reply(item, reply))]


def test_prompt_files_in_every_layout(tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_jsonl(
        path,
        [
            {"prompt": "What is 2 + 3?", "answer": 5},
            {"prompt": [{"role": "user", "content": "你好？"}], "system": "Be brief."},
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "3 + 4?"},
                ],
                "answer": "7",
            },
            {
                "question": "Tom has 1,000 apples and buys 250 more. How many?",
                "answer": "1000 + 250 = 1250\n#### 1,250",
            },
        ],
    )
    prompts, report = read_prompts([path])
    assert [p.answer for p in prompts] == ["5", None, "7", "1250"]
    assert prompts[1].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好？"}]
    assert len(prompts[2].messages) == 3 and prompts[3].messages[-1]["content"].startswith("Tom has")
    assert prompts[3].source == f"{path}:4"
    assert dict(report.files[str(path)].read) == {"prompt": 2, "messages": 1, "gsm8k": 1}


@pytest.mark.parametrize(
    "record, message",
    [
        ({"text": "hello"}, "no prompt in the fields 'text'"),
        ({"prompt": ""}, "prompt: .*expected a non-empty string"),
        ({"prompt": 3}, "prompt: .*expected a string or a non-empty list of messages"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            r"messages\[1\].role: the prompt ends with an assistant turn",
        ),
        (
            {"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            r"prompt\[1\].role: two user turns",
        ),
        ({"prompt": "a", "answer": [1]}, "answer: .*expected a string or a number"),
        ({"question": "a", "answer": "work #### "}, "answer: nothing follows ####"),
    ],
)
def test_a_bad_prompt_record_names_file_line_and_field(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [{"prompt": "fine", "answer": "1"}, record])
    with pytest.raises(DataError, match=rf"bad.jsonl:2: ({message})"):
        read_prompts([path])
    prompts, report = read_prompts([path], skip_bad=True)
    assert len(prompts) == 1 and sum(report.skipped.values()) == 1


# -- rewards --------------------------------------------------------------------------------------------


def test_split_thinking():
    assert split_thinking("<|think|>3 and 4 make 7<|think_end|>The answer is 7.") == (
        "3 and 4 make 7",
        "The answer is 7.",
    )
    assert split_thinking("The answer is 7.") == (None, "The answer is 7.")
    assert split_thinking("<|think|>still thinking") == ("still thinking", "")


def test_the_builtin_verifiers():
    sum_ = RLPrompt(ask("What is 3 + 4?"), "7", tuple(str(v) for v in range(19) if v != 7), "arithmetic")
    arithmetic, facts, think = (build_reward(n, None) for n in ("arithmetic", "facts", "think"))
    replies = [
        "The answer is 7.",
        "7 or 8",
        "The answer is 17.",
        "no idea",
        "<|think|>3, 4, 5, 6, 7<|think_end|>7",
        "7.0",
    ]
    assert arithmetic([sum_] * len(replies), replies) == [1, 0, 0, 0, 1, 1]
    colour = RLPrompt(ask("What colour is Tom?"), "red", ("blue", "green"), "fact")
    assert facts([colour] * 4, ["Tom is red.", "Tom is reddish.", "red or blue", "<|think|>blue?<|think_end|>red"]) == [
        1,
        0,
        0,
        1,
    ]
    assert think([sum_] * 3, ["<|think|>4 more<|think_end|>7", "7", "<|think|>4 more"]) == [1, 0, 0]
    both = build_reward("arithmetic+think", None)
    assert both([sum_] * 2, ["<|think|>4 more<|think_end|>7", "7"]) == [2, 1]
    with pytest.raises(RewardError, match="expected built-in verifiers"):
        build_reward("arithmetics", None)
    with pytest.raises(RewardError, match=r"x.jsonl:3: the arithmetic reward .* has none"):
        arithmetic.check([RLPrompt(ask("hi"), None, source="x.jsonl:3")])
    with pytest.raises(RewardError, match="one number, got 'seven'"):
        arithmetic.check([RLPrompt(ask("hi"), "seven", source="x.jsonl:1")])


def test_a_users_reward_function_that_fails_is_an_error_never_a_zero(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "import math\n"
        "def length(messages, reply, answer):\n    return len(reply)\n"
        "def broken(messages, reply, answer):\n    raise KeyError('score')\n"
        "def text(messages, reply, answer):\n    return 'good'\n"
        "def nan(messages, reply, answer):\n    return math.nan\n"
        "def none(messages, reply, answer):\n    return None\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    prompt = RLPrompt(ask("What is 3 + 4?"), "7", source="p.jsonl:5")
    assert build_reward("python:my_rewards:length", None)([prompt] * 2, ["ab", "abc"]) == [2.0, 3.0]
    assert build_reward(f"python:{tmp_path / 'my_rewards.py'}:length", None)([prompt], ["abcd"]) == [4.0]
    with pytest.raises(
        RewardError, match=r"raised KeyError: 'score' on the prompt from p.jsonl:5 \('What is 3 \+ 4\?'\)"
    ):
        build_reward("python:my_rewards:broken", None)([prompt], ["7"])
    for name, shown in (("text", "'good'"), ("nan", "nan"), ("none", "None")):
        with pytest.raises(RewardError, match=rf"returned {shown} .*p.jsonl:5.*expected a finite number"):
            build_reward(f"python:my_rewards:{name}", None)([prompt], ["7"])
    with pytest.raises(RewardError, match="has no function 'missing'"):
        build_reward("python:my_rewards:missing", None)
    with pytest.raises(RewardError, match="cannot import no_such_module"):
        build_reward("python:no_such_module:f", None)
    with pytest.raises(RewardError, match="expected python:MODULE:FUNCTION"):
        build_reward("python:my_rewards", None)


def test_a_reward_model_with_another_tokenizer_is_refused(tmp_path, capsys):
    policy = tiny_chat_dir(tmp_path / "policy")
    other = tiny_chat_dir(tmp_path / "other")
    from tinylm.tokenizer import Tokenizer, train_tokenizer

    # a reward model made from a chat model whose tokenizer was trained on other text
    template = get_template("chatml")
    retrained = template.attach(train_tokenizer(["completely different words here"] * 30, vocab_size=280))
    model, _ = load_model_dir(other)
    from tinylm.model.reward import RewardModel
    from tinylm.modeldir import save_model_dir

    save_model_dir(RewardModel.from_language_model(model, retrained.eos_id), tmp_path / "rm", retrained)
    _, tokenizer = load_model_dir(policy)
    with pytest.raises(RewardError, match="tokenizer differs from the policy's"):
        build_reward(f"rm:{tmp_path / 'rm'}", tokenizer)
    with pytest.raises(RewardError, match="not a reward-model directory"):
        build_reward(f"rm:{policy}", tokenizer)
    assert isinstance(Tokenizer, type)


def test_a_reward_model_scores_the_whole_conversation(tmp_path):
    policy = tiny_chat_dir(tmp_path / "policy")
    model, tokenizer = load_model_dir(policy)
    from tinylm.model.reward import RewardModel
    from tinylm.modeldir import save_model_dir
    from tinylm.train.rm import score_conversations

    reward_model = RewardModel.from_language_model(model, tokenizer.token_to_id("<|endoftext|>"))
    torch.nn.init.normal_(reward_model.score.weight)
    save_model_dir(reward_model, tmp_path / "rm", tokenizer)
    reward = build_reward(f"rm:{tmp_path / 'rm'}", tokenizer)
    prompts = [RLPrompt(ask("the cat"), None), RLPrompt(ask("你好"), None)]
    replies = ["sat on the mat.", "世界"]
    expected = score_conversations(
        reward.model, tokenizer, [[*p.messages, {"role": "assistant", "content": r}] for p, r in zip(prompts, replies)]
    )
    assert reward(prompts, replies) == pytest.approx(expected.tolist())
    assert len(set(reward(prompts, replies))) == 2


# -- the loss and the rollouts --------------------------------------------------------------------


class Fixed(torch.nn.Module):
    """A "model" whose per-token log-probabilities are parameters: the loss's arithmetic, checked by hand."""

    def __init__(self, logps):
        super().__init__()
        self.logps = torch.nn.Parameter(torch.tensor(logps))

    def forward(self, input_ids, labels, per_token):
        return self.logps * (labels != IGNORE)


def test_grpo_loss_by_hand():
    batch = {
        "input_ids": torch.zeros(2, 3, dtype=torch.long),
        "labels": torch.tensor([[1, 1, IGNORE], [1, IGNORE, IGNORE]]),
        "advantages": torch.tensor([1.0, -1.0]),
        "rewards": torch.tensor([1.0, 0.0]),
        "group_std": torch.tensor([0.7, 0.7]),
    }
    model = Fixed([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    loss = GRPOLoss(beta=0.0, epsilon=0.2)
    value = loss(model, batch)
    assert loss.count(batch) == 3
    assert value.item() == pytest.approx(-(1 + 1) + 1)  # ratio 1: −A per token, summed
    value.backward()
    # the gradient of −A · π/π_old at π = π_old is −A per token
    assert model.logps.grad.tolist() == [[-1.0, -1.0, 0.0], [1.0, 0.0, 0.0]]
    metrics = loss.pop_metrics()
    assert metrics["count"] == 2 and metrics["reward"] == 1 and metrics["length"] == 3 and metrics["clip_fraction"] == 0

    # the KL to a reference: k3 = e^(ref − π) − (ref − π) − 1 per token
    batch["ref_logps"] = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    loss = GRPOLoss(beta=0.5, epsilon=0.2)
    value = loss(Fixed([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]]), batch)
    k3 = math.exp(-0.5) + 0.5 - 1
    assert value.item() == pytest.approx(-1 + 0.5 * k3, abs=1e-6)
    assert loss.pop_metrics()["kl"] == pytest.approx(k3 / 2)  # summed over replies: the first's mean of 2 tokens

    # a ratio past 1 + ε with a positive advantage is clipped: no gradient, counted
    batch["old_logps"] = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    model = Fixed([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    loss = GRPOLoss(beta=0.0, epsilon=0.2)
    loss(model, batch).backward()
    assert model.logps.grad[0, 0] == 0 and model.logps.grad[0, 1] == -1
    assert loss.pop_metrics()["clip_fraction"] == pytest.approx(0.5)  # a sum over replies: 1 of 2 tokens, 0 of 1


def rollout_setup(tmp_path, *overrides, reward="think"):
    from tinylm.config import load_config
    from tinylm.train.distributed import Distributed

    model, tokenizer = load_model_dir(tiny_chat_dir(tmp_path / "policy"))
    template = get_template("chatml")
    cfg = load_config(GRPOConfig, None, [*TINY, f"--grpo.reward={reward}", *overrides])
    prompts = [
        RLPrompt(ask(q), "7", kind="arithmetic", source=f"p:{i}")
        for i, q in enumerate(["the cat", "你好", "hi", "a dog"])
    ]
    encoded, _ = encode_prompts(prompts, template, tokenizer, 128, 6, False)
    reward = build_reward(reward, tokenizer)
    return (
        Rollouts(encoded, model.train(), tokenizer, template, reward, cfg, Distributed(0, 1, torch.device("cpu"))),
        model,
        encoded,
    )


def test_a_rollout_is_a_group_per_prompt_with_its_advantages(tmp_path):
    rollouts, model, encoded = rollout_setup(tmp_path)
    batch = rollouts.next_batch()
    rows = 4 * 4
    assert batch["input_ids"].shape[0] == rows and batch["advantages"].shape == (rows,)
    # each row: a prompt, then its reply labelled (shifted by one), nothing else
    for r in range(rows):
        labelled = (batch["labels"][r] != IGNORE).nonzero().flatten()
        start = int(labelled[0])
        prompt = next(p for p in encoded if batch["input_ids"][r, : len(p.ids)].tolist() == p.ids)
        assert start == len(prompt.ids) - 1 and 1 <= len(labelled) <= 6
    grouped = batch["advantages"].view(4, 4)
    assert torch.allclose(grouped.sum(-1), torch.zeros(4), atol=1e-4)  # relative to the group's mean
    assert model.training
    # the next round samples again; a prompt's replies differ within its group (sampling, own seeds)
    assert not torch.equal(rollouts.next_batch()["input_ids"], batch["input_ids"]) or rows == 0


def test_a_prompt_longer_than_the_context_is_named_or_counted(tmp_path):
    _, tokenizer = load_model_dir(tiny_chat_dir(tmp_path / "policy"))
    template = get_template("chatml")
    prompts = [RLPrompt(ask("hi"), source="p.jsonl:1"), RLPrompt(ask("the cat sat " * 40), source="p.jsonl:2")]
    with pytest.raises(
        DataError, match=r"p.jsonl:2: the prompt is \d+ tokens and its reply may be 32 .* context of 128"
    ):
        encode_prompts(prompts, template, tokenizer, 128, 32, False)
    kept, skipped = encode_prompts(prompts, template, tokenizer, 128, 32, True)
    assert len(kept) == 1 and skipped == 1


# -- tinylm grpo ------------------------------------------------------------------------------------------


REWARDS = """
def letters(messages, reply, answer):
    # the share of the reply's characters that are the letter t: easy to find, easy to learn
    return sum(ch == "t" for ch in reply) / max(len(reply), 1)
"""


def grpo_args(init, out, *extra):
    return ["grpo", "--init", str(init), "--out", str(out), *TINY, *extra]


def test_a_tiny_grpo_run_raises_its_reward(tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny_rewards.py").write_text(REWARDS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    policy = tiny_chat_dir(tmp_path / "policy")
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": q} for q in ["the cat", "你好", "hi there", "the dog ran", "sat on", "小明"] * 5])
    out = tmp_path / "run"
    args = grpo_args(policy, out, "--data", str(prompts), "--reward", "python:tiny_rewards:letters")
    assert main([*args, "--train.max_steps=30", "--train.lr=0.01", "--grpo.beta=0.001", "--train.eval_every=15"]) == 0
    rewards = [r["reward"] for r in read_metrics(out) if "reward" in r]
    assert len(rewards) == 30
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.1, (first, last)
    report = json.loads((out / "grpo.json").read_text())
    assert report["reward"] == "python:tiny_rewards:letters" and report["steps"] == 30
    assert report["after"]["val_reward"] > report["before"]["val_reward"]
    assert [p["step"] for p in report["curve"]] == [0, 15, 30]  # before training, then each evaluation
    assert (out / "rewards.png").stat().st_size > 10_000
    assert main(["report", str(out)]) == 0
    page = (out / "report" / "report.md").read_text(encoding="utf-8")
    assert "reinforcement learning (GRPO, reward python:tiny_rewards:letters)" in page
    assert "GRPO, held-out" in page and "rewards.png" in page
    assert "training reward" in (out / "report" / "report.html").read_text(encoding="utf-8")
    assert all({"kl", "length", "clip_fraction", "reward_std"} <= set(r) for r in read_metrics(out) if "reward" in r)
    model, _ = load_model_dir(out / "final")
    assert model.config.max_position_embeddings == 128


def test_resuming_in_the_middle_of_a_round_takes_the_same_steps(tmp_path, monkeypatch):
    """Two updates per rollout, a checkpoint after step 3 (one update into the second round): the
    resumed run must end with the weights of the straight one."""
    (tmp_path / "tiny_rewards.py").write_text(REWARDS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    policy = tiny_chat_dir(tmp_path / "policy")
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": q} for q in ["the cat", "你好", "hi there", "the dog ran"] * 6])
    common = ["--data", str(prompts), "--reward", "python:tiny_rewards:letters", "--grpo.updates=2", "--train.lr=0.01"]
    assert main(grpo_args(policy, tmp_path / "straight", *common, "--train.max_steps=6")) == 0
    assert main(grpo_args(policy, tmp_path / "split", *common, "--train.max_steps=3", "--train.save_every=3")) == 0
    state = json.loads(next((tmp_path / "split" / "checkpoints").glob("*/trainer.json")).read_text())
    assert state["data"]["served"] == 1 and state["data"]["round"]  # the round being served is kept
    assert main(grpo_args(policy, tmp_path / "split", *common, "--train.max_steps=6", "--resume")) == 0
    straight, _ = load_model_dir(tmp_path / "straight" / "final")
    resumed, _ = load_model_dir(tmp_path / "split" / "final")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    clipped = [r["clip_fraction"] for r in read_metrics(tmp_path / "straight") if "clip_fraction" in r]
    assert any(c > 0 for c in clipped)  # the second update of a round moves the ratio off 1


def test_grpo_on_builtin_arithmetic_reports_every_heldout_kind(tmp_path, capsys):
    policy = tiny_chat_dir(tmp_path / "policy")
    out = tmp_path / "run"
    assert (
        main(
            grpo_args(
                policy,
                out,
                "--train.max_steps=2",
                "--grpo.group_size=2",
                "--data.kinds=[arithmetic]",
                "--reward",
                "arithmetic",
            )
        )
        == 0
    )
    report = json.loads((out / "grpo.json").read_text())
    # the tiny tokenizer spells Chinese in bytes: some held-out questions do not fit its context of 128
    assert report["reward"] == "arithmetic" and report["prompts"] == 1056 and 0 < report["heldout"] < 606
    assert "held-out prompts too long for the context" in capsys.readouterr().err
    kinds = {k for k in report["after"] if k.startswith("heldout/")}
    assert {"heldout/arithmetic/en", "heldout/arithmetic/zh", "heldout/fact/en", "heldout/refusal/zh"} <= kinds
    assert set(report["before"]) == set(report["after"])


def test_grpo_errors_name_the_problem(tmp_path, capsys):
    policy = tiny_chat_dir(tmp_path / "policy")
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": "hi", "answer": "3"}, {"prompt": "what is two?"}])
    cases = [
        (["--data", str(prompts), "--reward", "arithmetic"], "prompts.jsonl:2: the arithmetic reward compares replies"),
        (["--reward", "python:nowhere:f"], "cannot import nowhere"),
        (["--reward", "exactness"], "expected built-in verifiers"),
        (["--group-size", "1"], "group_size: a group needs at least 2 replies"),
        (["--data", str(prompts), "--reward", "think", "--grpo.max_new_tokens=200"], "prompts.jsonl:1: the prompt is"),
    ]
    for extra, message in cases:
        assert main(grpo_args(policy, tmp_path / "bad", *extra, "--train.max_steps=1")) != 0
        assert message in capsys.readouterr().err, message


def test_the_reward_reads_the_reply_with_its_reasoning_and_without_its_end_of_turn(tmp_path):
    from conftest import ScriptedLM

    from tinylm.infer.engine import Engine
    from tinylm.infer.sampling import SamplingSettings

    _, tokenizer = load_model_dir(tiny_chat_dir(tmp_path / "policy"))
    think, think_end, im_end = (tokenizer.token_to_id(t) for t in ("<|think|>", "<|think_end|>", "<|im_end|>"))
    prompt = tokenizer.encode("3 + 4?")
    for script, stops in (
        ([think, *tokenizer.encode("3 4"), think_end, *tokenizer.encode("7"), im_end], {"stop_token_ids": [im_end]}),
        ([think, *tokenizer.encode("3 4"), think_end, *tokenizer.encode("7 </s> more")], {"stop_strings": ["</s>"]}),
    ):
        engine = Engine(ScriptedLM(tokenizer.vocab_size, script, len(prompt)), tokenizer)
        (completion,) = engine.run([prompt], SamplingSettings(max_new_tokens=40, temperature=0, **stops))
        assert completion.text.rstrip() == "<|think|>3 4<|think_end|>7"
        assert build_reward("arithmetic", None)([RLPrompt(ask("3 + 4?"), "7")], [completion.text]) == [1]


def test_builtin_kinds_take_weights(tmp_path):
    from tinylm.config import ConfigError, load_config
    from tinylm.train.grpo import prompt_sets

    cfg = load_config(GRPOConfig, None, ["--data.kinds=[arithmetic:3,identity]"])
    train, heldout, where = prompt_sets(cfg)
    assert cfg.data.weights == {"arithmetic": 3, "identity": 1}
    assert len([p for p in train if p.kind == "arithmetic"]) == 3 * 1056
    assert len([p for p in train if p.kind == "identity"]) == len(builtin_prompts(World(0), ("identity",)))
    assert "arithmetic ×3, identity" in where and len(heldout) == 606
    for bad in ("[arithmetic:0]", "[arithmetic:x]", "[poems]"):
        with pytest.raises(ConfigError, match="expected KIND or KIND:WEIGHT"):
            load_config(GRPOConfig, None, [f"--data.kinds={bad}"])


def test_grpo_trains_a_lora_adapter_against_the_adapter_off_reference(tmp_path, monkeypatch):
    (tmp_path / "tiny_rewards.py").write_text(REWARDS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    policy = tiny_chat_dir(tmp_path / "policy")
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": q} for q in ["the cat", "你好", "hi there", "the dog ran"] * 6])
    out = tmp_path / "run"
    args = ["--data", str(prompts), "--reward", "python:tiny_rewards:letters", "--lora", "--train.lr=0.01"]
    assert main(grpo_args(policy, out, *args, "--train.max_steps=3")) == 0
    assert (out / "final" / "adapter_config.json").is_file()
    kl = [r["kl"] for r in read_metrics(out) if "kl" in r]
    assert kl[0] == pytest.approx(0, abs=1e-6) and kl[-1] > 0  # the adapter starts as the reference, then moves

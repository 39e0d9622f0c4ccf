"""Continuous batching: requests that join and leave a running batch get exactly what they would get
alone; per-request sampling, penalties, log-probabilities, n choices and cancellation."""

import threading

import pytest
import torch
from conftest import wait_until

from tests.test_engine import greedy, make_model, recompute_greedy
from tinylm.infer.engine import Engine
from tinylm.infer.sampling import SamplingSettings, sample_rows
from tinylm.infer.scheduler import QueueFull, Request, Scheduler
from tinylm.tokenizer import train_tokenizer


class Collector:
    """Gathers one request's events: ``started`` is set by the first, ``wait()`` returns once every choice
    finished (or it failed). With ``pause_after``, the callback holds the scheduler's thread when choice 0
    has that many tokens, sets ``paused`` and waits for ``resume``: the test acts at a known token."""

    def __init__(self, n=1, pause_after=None):
        self.tokens = [[] for _ in range(n)]
        self.texts = [[] for _ in range(n)]
        self.logprobs = [[] for _ in range(n)]
        self.finish = [None] * n
        self.error = None
        self.started, self.done = threading.Event(), threading.Event()
        self.pause_after, self.paused, self.resume = pause_after, threading.Event(), threading.Event()

    def __call__(self, event):
        self.started.set()
        if event.error is not None:
            self.error = event.error
            self.done.set()
            return
        self.tokens[event.index].append(event.token_id)
        self.texts[event.index].append(event.text)
        self.logprobs[event.index].append(event.logprob)
        if event.finish_reason:
            self.finish[event.index] = event.finish_reason
            if all(self.finish):
                self.done.set()
        if event.index == 0 and len(self.tokens[0]) == self.pause_after:
            self.paused.set()
            self.resume.wait(timeout=30)

    def wait_started(self, timeout=30):
        assert self.started.wait(timeout), "the request never started"

    def wait(self, timeout=60):
        assert self.done.wait(timeout), "the request never finished"
        assert self.error is None, self.error
        return self


@pytest.fixture
def engine():
    return Engine(make_model())


def run(scheduler, prompt, settings, **kwargs):
    collector = Collector(kwargs.get("n", 1))
    scheduler.submit(Request(prompt, settings, **kwargs), collector)
    return collector


PROMPTS = [[3, 4, 5], list(range(20, 33)), [7, 250, 1, 9, 60, 61, 62], [11], [40, 41] * 6, [99, 98, 97, 96]]


def test_requests_joining_and_leaving_get_what_they_would_get_alone(engine):
    """Six greedy requests of different lengths and budgets through three slots, arriving while
    others run: each one's tokens equal a full recomputation without any cache."""
    scheduler = Scheduler(engine, max_batch=3)
    try:
        collectors = []
        for i, prompt in enumerate(PROMPTS):
            collectors.append(run(scheduler, prompt, greedy(8 + 3 * i)))
            if i % 2:  # two arrive together, then the next two once these run
                collectors[-1].wait_started()
        for prompt, collector, i in zip(PROMPTS, collectors, range(len(PROMPTS))):
            collector.wait()
            assert collector.tokens[0] == recompute_greedy(engine.model, prompt, 8 + 3 * i)
            assert collector.finish == ["length"]
        wait_until(lambda: scheduler.stats()["running"] == 0, "the finished requests to leave their slots")
        assert scheduler.steps < sum(8 + 3 * i for i in range(len(PROMPTS)))  # steps were shared
    finally:
        scheduler.close()


def test_seeded_sampling_does_not_depend_on_the_company(engine):
    settings = SamplingSettings(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=7, stop_token_ids=[])
    scheduler = Scheduler(engine, max_batch=8)
    try:
        alone = run(scheduler, PROMPTS[2], settings).wait().tokens[0]
        crowd = [
            run(scheduler, p, SamplingSettings(max_new_tokens=20, temperature=1.3, stop_token_ids=[])) for p in PROMPTS
        ]
        again = run(scheduler, PROMPTS[2], settings)
        for c in crowd:
            c.wait()
        assert again.wait().tokens[0] == alone
        unseeded = [
            run(scheduler, PROMPTS[2], SamplingSettings(max_new_tokens=12, stop_token_ids=[])).wait().tokens[0]
            for _ in range(3)
        ]
        assert len({tuple(u) for u in unseeded}) > 1
    finally:
        scheduler.close()


def test_n_choices_share_a_prompt_and_differ(engine):
    scheduler = Scheduler(engine, max_batch=4)
    try:
        out = run(
            scheduler, PROMPTS[1], SamplingSettings(max_new_tokens=10, temperature=1.0, seed=3, stop_token_ids=[]), n=3
        ).wait()
        assert [len(t) for t in out.tokens] == [10, 10, 10]
        assert len({tuple(t) for t in out.tokens}) == 3
        greedy_n = run(scheduler, PROMPTS[1], greedy(10), n=2).wait()
        assert greedy_n.tokens[0] == greedy_n.tokens[1] == recompute_greedy(engine.model, PROMPTS[1], 10)
        with pytest.raises(ValueError, match="n must be between 1 and 4"):
            scheduler.submit(Request(PROMPTS[1], greedy(4), n=5), Collector())
    finally:
        scheduler.close()


def test_cancel_frees_the_slot_and_leaves_others_alone(engine):
    scheduler = Scheduler(engine, max_batch=2)
    try:
        slow = Collector(pause_after=3)
        ticket = scheduler.submit(Request(PROMPTS[0], greedy(80)), slow)
        other = run(scheduler, PROMPTS[3], greedy(30))
        try:
            assert slow.paused.wait(30), "the request never got its third token"
            ticket.cancel()  # while its third token is being handed over
        finally:
            slow.resume.set()
        waiting = run(scheduler, PROMPTS[4], greedy(12))  # needs the cancelled request's slot
        assert other.wait().tokens[0] == recompute_greedy(engine.model, PROMPTS[3], 30)
        assert waiting.wait().tokens[0] == recompute_greedy(engine.model, PROMPTS[4], 12)
        assert slow.finish == [None] and slow.tokens[0] == recompute_greedy(engine.model, PROMPTS[0], 3)
        wait_until(lambda: scheduler.stats()["running"] == 0, "the finished requests to leave their slots")
    finally:
        scheduler.close()


def test_text_stop_strings_and_finish_reasons_match_the_engine():
    tok = train_tokenizer(
        ["the cat sat on the mat. the dog ran.", "User: hi\nAssistant: hello there", "你好 世界"] * 20, vocab_size=300
    )
    engine = Engine(make_model(vocab_size=tok.vocab_size), tok)
    scheduler = Scheduler(engine, max_batch=4)
    try:
        prompts = ["the cat", "你好", "User: hi\nAssistant:"]
        for stops in ([], ["a"], ["the", "你"]):
            settings = SamplingSettings(max_new_tokens=24, temperature=0, stop_strings=stops)
            expected = engine.run(prompts, settings)
            got = [run(scheduler, engine.encode(p), settings) for p in prompts]
            for want, collector in zip(expected, got):
                collector.wait()
                assert "".join(collector.texts[0]) == want.text
                assert collector.finish[0] == want.finish_reason
                assert collector.tokens[0] == want.token_ids
    finally:
        scheduler.close()


def test_openai_penalties_and_logprobs(engine):
    model = engine.model
    scheduler = Scheduler(engine, max_batch=4)
    try:
        prompt = PROMPTS[1]
        out = run(scheduler, prompt, greedy(16), frequency_penalty=1.5, presence_penalty=0.5, logprobs=3).wait()
        # reference: recompute without a cache, penalising the generated tokens by OpenAI's rule
        ids, counts = list(prompt), torch.zeros(model.config.vocab_size)
        for token, logprob in zip(out.tokens[0], out.logprobs[0]):
            with torch.no_grad():
                logits = model(torch.tensor([ids]))[0, -1]
            raw = logits.log_softmax(-1)
            assert logprob.token_id == token
            assert logprob.logprob == pytest.approx(float(raw[token]), abs=1e-4)
            assert [t for t, _ in logprob.top] == raw.topk(3).indices.tolist()
            penalised = logits - 0.5 * (counts > 0) - 1.5 * counts
            assert token == int(penalised.argmax())
            ids.append(token)
            counts[token] += 1
        plain = recompute_greedy(model, prompt, 16)
        assert out.tokens[0] != plain  # the penalty changed something, so the comparison above means something
    finally:
        scheduler.close()


def test_sample_rows_follows_each_rows_settings():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]] * 4)
    uniform = torch.rand(4)
    # temperature 0, top_k 1 and a tiny top_p all give the most likely token
    out = sample_rows(
        logits,
        torch.tensor([0.0, 1.0, 1.0, 1.0]),
        torch.tensor([0, 1, 0, 0]),
        torch.tensor([1.0, 1.0, 1e-3, 1.0]),
        uniform,
    )
    assert out[:3].tolist() == [0, 0, 0]
    # a row's draws follow its softmax (temperature 2 here), within sampling error
    draws = 20000
    rows = logits[:1].expand(draws, -1)
    got = sample_rows(
        rows, torch.full((draws,), 2.0), torch.zeros(draws, dtype=torch.long), torch.ones(draws), torch.rand(draws)
    )
    freq = torch.bincount(got, minlength=5).float() / draws
    assert torch.allclose(freq, (logits[0] / 2).softmax(-1), atol=0.015)
    # top_k 2 and top_p 0.6 keep only the tokens they should
    got = sample_rows(rows, torch.ones(draws), torch.full((draws,), 2), torch.ones(draws), torch.rand(draws))
    assert set(got.tolist()) == {0, 1}
    p = logits[0].softmax(-1)  # [0.61, 0.22, ...]: 0.6 is reached by the first token alone
    got = sample_rows(
        rows,
        torch.ones(draws),
        torch.zeros(draws, dtype=torch.long),
        torch.full((draws,), float(p[0]) + 0.01),
        torch.rand(draws),
    )
    assert set(got.tolist()) == {0, 1}


def test_a_failing_callback_does_not_stop_the_others(engine):
    scheduler = Scheduler(engine, max_batch=4)

    def broken(event):
        raise RuntimeError("client went away")

    try:
        scheduler.submit(Request(PROMPTS[0], greedy(20)), broken)
        ok = run(scheduler, PROMPTS[1], greedy(20))
        assert ok.wait().tokens[0] == recompute_greedy(engine.model, PROMPTS[1], 20)
        wait_until(lambda: scheduler.stats()["running"] == 0, "the request whose callback failed to leave its slot")
    finally:
        scheduler.close()


def test_requests_that_cannot_fit_are_refused(engine):
    scheduler = Scheduler(engine, max_batch=2, max_waiting=1)
    try:
        with pytest.raises(ValueError, match="exceed the 96 tokens"):
            scheduler.submit(Request(list(range(90)), greedy(10)), Collector())
        with pytest.raises(ValueError, match="empty"):
            scheduler.submit(Request([], greedy(10)), Collector())
    finally:
        scheduler.close()


def test_a_request_that_cannot_be_prefilled_fails_alone(engine):
    scheduler = Scheduler(engine, max_batch=4, thread=False)
    good, bad = Collector(), Collector()
    scheduler.submit(Request(PROMPTS[1], greedy(10)), good)
    scheduler.submit(Request([5, 10**6, 7], greedy(10)), bad)  # an id past the embedding table
    loop = threading.Thread(target=scheduler.run)
    loop.start()  # both are admitted in the same round
    try:
        assert good.wait().tokens[0] == recompute_greedy(engine.model, PROMPTS[1], 10)
        assert bad.done.wait(10) and bad.error
    finally:
        scheduler.close()
        loop.join()


def test_admission_is_bounded_and_skips_cancelled(engine):
    scheduler = Scheduler(engine, max_batch=8, max_waiting=3, max_prefill_tokens=30, thread=False)
    tickets = [scheduler.submit(Request(list(range(1, 13)), greedy(4)), Collector()) for _ in range(3)]
    with pytest.raises(QueueFull):
        scheduler.submit(Request([1], greedy(4)), Collector())
    tickets[0].cancel()
    last = scheduler.submit(Request([1], greedy(4)), Collector())  # the cancelled request no longer takes a place
    # 12-token prompts under a 30-token prefill budget: two go together (2 x 12), the third waits
    assert scheduler._take_admissible() == tickets[1:]
    assert scheduler._take_admissible() == [last]
    scheduler.close()


def test_a_draw_of_zero_never_picks_an_impossible_token():
    logits = torch.tensor([[float("-inf"), 1.0, 2.0]])
    assert (
        sample_rows(logits, torch.ones(1), torch.zeros(1, dtype=torch.long), torch.ones(1), torch.zeros(1)).item() == 1
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_requests_joining_and_leaving_match_the_engine(dtype):
    """On a GPU, twelve greedy requests through four slots against the engine alone. In fp32 all
    must match; in bf16 a batch's different kernels may round differently, so most must."""
    engine = Engine(make_model(vocab_size=300, max_position_embeddings=256).to("cuda", dtype))
    prompts = [list(range(3, 3 + n)) for n in (5, 40, 17, 90, 3, 64, 33, 8, 120, 21, 50, 11)]
    alone = [engine.generate([p], greedy(48))[0] for p in prompts]
    scheduler = Scheduler(engine, max_batch=4)
    try:
        collectors = []
        for i, prompt in enumerate(prompts):
            collectors.append(run(scheduler, prompt, greedy(48)))
            if i % 3:  # the first two of every three arrive together, the third once the second runs
                collectors[-1].wait_started()
        same = sum(c.wait().tokens[0] == a for c, a in zip(collectors, alone))
        assert same == 12 if dtype == torch.float32 else same >= 9, same
    finally:
        scheduler.close()

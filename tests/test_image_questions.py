"""The held-out picture questions: replies judged by the choices they name, follow-ups asked after the
model's own earlier replies, and a tally per kind against chance."""

from types import SimpleNamespace

import pytest

from tinylm.eval.image_questions import answer_questions, is_right, tally


class EchoEngine:
    """Stands in for the engine: replies with the number of the turn it is asked in, and keeps the prompts."""

    def __init__(self):
        self.tokenizer = SimpleNamespace(chat_template=None, eos_id=0)
        self.model = SimpleNamespace(config=SimpleNamespace(eos_token_ids=lambda: [0]))
        self.calls = []

    def run(self, prompts, settings, images):
        self.calls.append((prompts, images))
        return [SimpleNamespace(text=f" turn {prompt.count('User:')} ") for prompt in prompts]


def test_follow_ups_are_asked_after_the_models_own_replies_and_first_turns_are_shared():
    records = [
        {"image": "a.png", "question": "Colour?"},
        {"image": "a.png", "question": "Shape?"},
        {"image": "a.png", "question": "Shape?", "before": ["Colour?"]},
        {"image": "a.png", "question": "Where?", "before": ["Colour?", "Shape?"]},
        {"image": "b.png", "question": "Where?", "before": ["Colour?"]},
    ]
    engine = EchoEngine()
    replies = answer_questions(engine, records, ["A", "A", "A", "A", "B"])
    assert replies == ["turn 1", "turn 1", "turn 2", "turn 3", "turn 2"]
    (first, first_images), (second, _), (third, _) = engine.calls  # one batch per turn
    assert len(first) == 3 and first_images == [["A"], ["A"], ["B"]]  # a.png's "Colour?" answered once
    assert third == [
        "User: <image>\nColour?\nAssistant: turn 1\nUser: Shape?\nAssistant: turn 2\nUser: Where?\nAssistant:"
    ]
    assert second[0].startswith("User: <image>\nColour?\nAssistant: turn 1\nUser: Shape?")


def test_a_reply_is_right_when_it_names_only_the_answer_and_follow_ups_are_a_kind_of_their_own():
    choices = ["at the top", "at the top left", "in the middle"]
    record = {"kind": "position", "answer": "at the top left", "choices": choices}
    assert is_right("It is at the top left.", record) and not is_right("It is at the top.", record)
    records = [
        record,
        {"kind": "follow-up", "asks": "count", "answer": "2", "choices": ["2", "3", "4"]},
        {"kind": "follow-up", "asks": "colour", "answer": "red", "choices": ["red", "blue"]},
    ]
    report = tally(records, ["It is at the top left.", "There are 3.", "It is red."])
    assert report["accuracy"] == pytest.approx(2 / 3) and report["questions"] == 3
    follow_ups = report["by_kind"]["follow-up"]
    assert follow_ups == {"accuracy": 0.5, "chance": pytest.approx((1 / 3 + 1 / 2) / 2), "questions": 2}

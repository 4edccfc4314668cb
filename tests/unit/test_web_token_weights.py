"""The token weights preview (web/js/token_weights_parse.js), run in QuickJS: it must accept and find what the
reweight node accepts and finds (attention/tokens.py), or the user sees a red error for a valid entry, or none for
one the node will refuse."""
import json
import re
from pathlib import Path

import pytest

from comfyui_personalize.attention.tokens import parse_word_weights
from comfyui_personalize.training.errors import InputError

quickjs = pytest.importorskip("quickjs")  # in requirements-dev.txt: CI runs this
SOURCE = Path(__file__).resolve().parents[2] / "web" / "js" / "token_weights_parse.js"


@pytest.fixture(scope="module")
def js():
    context = quickjs.Context()
    context.eval(re.sub(r"^export ", "", SOURCE.read_text(), flags=re.M))  # an ES module, evaluated as a script
    return lambda name, *args: json.loads(context.get(name)(*args).json())


@pytest.mark.parametrize("entry", ["red:2", "red: 2", "red:-1.5", "red:.5", "red:1e0", "red:+3", "red:0x10",
                                   "red:0b1", "red:", "red:two", ":2", "red:inf", "red:nan", "embedding:zwx:2"])
def test_weights_are_accepted_exactly_where_the_node_accepts_them(js, entry):
    try:
        expected = [w for _, w in parse_word_weights(entry)]
    except InputError:
        expected = None
    parsed = js("parseWeights", entry)
    assert parsed[0]["ok"] == (expected is not None), entry
    if expected is not None:
        assert parsed[0]["weight"] == expected[0]


@pytest.mark.parametrize("prompt, spec, weights", [
    ("a photo of a (red:1.3) car", "red:2", [None, None, None, None, 2, None]),  # ComfyUI's weight syntax
    ("a (photo of a red car:1.2)", "car:2", [None, None, None, None, None, 2]),
    ("a photo of a red-car", "red:2", [None, None, None, None, 2]),  # CLIP splits at the hyphen
    ("A photo, of a red car.", "photo:2, red car:0.5", [None, 2, None, None, 0.5, 0.5]),
    ("a photo of embedding:zwx dog", "embedding:zwx:3", [None, None, None, 3, None]),
])
def test_words_are_found_where_the_node_finds_them(js, prompt, spec, weights):
    out = js("weightedWords", prompt, spec)
    assert out["problems"] == [] and out["weights"] == weights


def test_a_word_not_in_the_prompt_and_a_bad_weight_are_listed(js):
    out = js("weightedWords", "a photo of a red car", "blue:2, red:lots, car:0x10")
    assert out["problems"] == ["'blue' is not in the prompt", "'red:lots' needs word:number",
                               "'car:0x10' needs word:number"]


def test_a_word_given_twice_is_refused_by_both(js):
    """"red:2, red:3" used to keep the last weight with no word; the node now refuses it and the preview says so."""
    with pytest.raises(InputError, match="'Red' is given twice \\(2 and 3\\)"):
        parse_word_weights("red:2, Red:3")
    out = js("weightedWords", "a photo of a red car", "red:2, Red:3, red  car:1, red car:2")
    assert out["problems"] == ["'red' is given twice", "'red car' is given twice"]
    assert parse_word_weights("red:2, red car:3") == [("red", 2.0), ("red car", 3.0)]  # a phrase is its own entry

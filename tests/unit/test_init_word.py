"""The init word picked from the images (training/init_word.py): the candidate with which the model denoises the
images best wins, every candidate sees the same timesteps and noise, and each image is conditioned on its own
caption (and SDXL size/crop)."""
import pytest
import torch

from comfyui_personalize.training.batches import LatentBucket
from comfyui_personalize.training.errors import InputError
from comfyui_personalize.training.init_word import candidate_words, denoising_errors, pick_init_word, timesteps
from comfyui_personalize.training.schedule import NoiseSchedule
from comfyui_personalize.training.task import Conditioning

SCHEDULE_ABAR = torch.linspace(0.999, 0.01, 1000)


def test_candidates_are_the_comma_separated_words():
    assert candidate_words(" dog ") == ["dog"]
    assert candidate_words("dog, plush toy,\ncat,") == ["dog", "plush toy", "cat"]
    for bad in ("", " , "):
        with pytest.raises(InputError, match="init_word: is empty"):
            candidate_words(bad)
    with pytest.raises(InputError, match="init_word: names a word twice"):
        candidate_words("dog, cat, dog")


def test_timesteps_cover_the_schedule_evenly():
    assert timesteps(4, 1000).tolist() == [125, 375, 625, 875]
    assert timesteps(1, 1000).tolist() == [500]


def setup(prediction, guesses, n_images=2):
    """A model that denoises perfectly toward the x0 its caption's word stands for: the true image for a word
    whose offset is zero, the image shifted by the word's offset otherwise. The context carries the word's index;
    y's micro tail carries the image's index and two values of its own (SDXL's size/crop per row)."""
    torch.manual_seed(0)
    latents = torch.randn(n_images, 4, 4, 4)
    words = list(guesses)
    schedule = NoiseSchedule(SCHEDULE_ABAR, prediction)
    micro = torch.cat([torch.arange(n_images, dtype=torch.float32)[:, None], torch.randn(n_images, 2)], 1)
    seen = []

    def encode(captions, size):
        seen.append((list(captions), size))
        index = torch.tensor([float(words.index(c.split()[-1])) for c in captions])
        return Conditioning(index.view(-1, 1, 1).expand(-1, 1, 8).clone(), torch.zeros(len(captions), 5))

    def predict(x_t, t, cond):
        assert x_t.shape[0] == cond.context.shape[0] == t.shape[0]
        image = cond.y[:, 2].long()  # the tail: 2 columns of y before it stay the pooled part
        assert torch.equal(cond.y[:, 2:], micro[image])  # every row carries its own image's size/crop
        guess = torch.stack([guesses[words[int(w)]] for w in cond.context[:, 0, 0]])
        a, s = schedule._coefficients(t, x_t)
        x0_guess = latents[image] + guess
        eps = (x_t - a * x0_guess) / s
        return eps if prediction == "eps" else a * eps - s * x0_guess

    bucket = LatentBucket(latents, ["a photo of embedding:zwx"] * n_images, (32, 32), micro=micro)
    return bucket, encode, predict, schedule, seen


def write(caption, word):
    return caption.replace("embedding:zwx", word)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_word_the_model_sees_in_the_images_wins_and_the_errors_follow_the_distance(prediction):
    guesses = {"cat": torch.full((4, 4, 4), 0.5), "dog": torch.zeros(4, 4, 4), "car": torch.full((4, 4, 4), 2.0),
               "kitten": torch.full((4, 4, 4), 0.5)}
    bucket, encode, predict, schedule, seen = setup(prediction, guesses)
    words = list(guesses)
    errors = denoising_errors(words, [bucket], write, encode, predict, schedule, torch.device("cpu"), seed=3,
                              chunk=3)  # 16 rows in calls of 3: chunks cut across images
    assert errors["dog"] == pytest.approx(0.0, abs=1e-8)
    assert 0 < errors["cat"] < errors["car"]
    assert errors["cat"] == errors["kitten"]  # the same noise and timesteps for every candidate
    assert pick_init_word(words, errors) == "dog"
    assert [size for _, size in seen] == [(32, 32)] * 4  # one encode per candidate, at the bucket's size
    assert seen[0][0] == ["a photo of cat", "a photo of cat"]


def test_a_tie_goes_to_the_first_listed_and_the_draw_follows_the_seed():
    guesses = {"cat": torch.full((4, 4, 4), 0.5), "dog": torch.full((4, 4, 4), -0.5)}
    bucket, encode, predict, schedule, _ = setup("eps", guesses)
    args = ([bucket], write, encode, predict, schedule, torch.device("cpu"))
    first = denoising_errors(["cat", "dog"], *args, seed=1)
    assert pick_init_word(["dog", "cat"], {"cat": 1.0, "dog": 1.0}) == "dog"
    assert denoising_errors(["cat", "dog"], *args, seed=1) == first
    assert denoising_errors(["cat", "dog"], *args, seed=2) != first


def test_each_candidate_is_announced_so_a_cancel_stops_the_ranking():
    guesses = {"cat": torch.zeros(4, 4, 4), "dog": torch.zeros(4, 4, 4)}
    bucket, encode, predict, schedule, _ = setup("eps", guesses)
    calls = []

    def on_word():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        denoising_errors(["cat", "dog"], [bucket], write, encode, predict, schedule,
                         torch.device("cpu"), seed=0, on_word=on_word)
    assert len(calls) == 2

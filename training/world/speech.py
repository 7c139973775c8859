"""Synthesized speech for the synthetic world: seeded sentences spoken by ``espeak-ng``.

A clip's speech is a few sentences from a small word grammar, spoken in one call to the
``espeak-ng`` binary with one voice (accent + variant), speed and pitch, with silent gaps between
sentences (SSML ``<break>``) so that idle behaviour appears in the video. Audio is resampled from
espeak-ng's 22050 Hz to 16 kHz mono float32.

Train and held-out speech never share a sentence: every content word list is split in two, train
sentences use only the train words, and each held-out sentence contains at least one held-out-only
noun (its subject). The two splits also draw from different RNG streams (the caller's ``rng``
should come from a seed that includes the split; see ``training.world.clip``).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from engine.errors import UserError

ESPEAK = "espeak-ng"
ESPEAK_RATE_HZ = 22050

ACCENTS = ("en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-gb-x-gbclan")
VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+f1", "+f2", "+f3", "+f4")
SPEED_WPM = (130, 190)
PITCH = (30, 70)
GAP_S = (0.2, 1.5)  # silence between sentences
LEAD_S = (0.0, 0.6)  # silence before the first sentence

_NOUNS = (
    "cat dog bird house river garden window table letter painter doctor teacher car train boat "
    "bottle candle mountain forest island bridge kitchen market village farmer sailor singer "
    "basket blanket button camera castle cloud coffee corner cousin dancer desert dinner dragon "
    "engine farm feather finger flower friend hammer hat helmet jacket kettle king ladder lamp "
    "lemon lion machine mirror monkey needle ocean orange pencil pillow planet pocket puppet "
    "queen rabbit radio robot rocket sandwich shadow shelf shoe sister spider spoon station "
    "storm street student sugar tiger tower tunnel uncle wagon wallet whistle winter wizard"
).split()
_ADJS = (
    "red blue green small big quiet loud happy sad old young bright dark warm cold soft heavy "
    "light quick slow clever brave gentle strange lucky empty golden silver wooden tiny huge "
    "sleepy hungry careful busy honest friendly noisy shiny rusty dusty fancy simple famous "
    "secret modern ancient purple yellow calm wild narrow broad sweet bitter"
).split()
# (base, past) verb forms.
_VERBS = tuple(
    tuple(p.split("/"))
    for p in (
        "find/found see/saw carry/carried paint/painted open/opened close/closed follow/followed "
        "watch/watched clean/cleaned move/moved push/pushed pull/pulled fix/fixed build/built "
        "bring/brought catch/caught hold/held keep/kept leave/left lift/lifted borrow/borrowed "
        "count/counted draw/drew drop/dropped wash/washed visit/visited remember/remembered "
        "describe/described explain/explained measure/measured cover/covered"
    ).split()
)
_NAMES = (
    "Anna Boris Clara David Emma Felix Grace Henry Iris Jonas Karen Leo Maria Nora Oscar Paula "
    "Quentin Rosa Simon Tara Umar Vera Walter Xenia Yusuf Zoe"
).split()
_PREPS = "near behind under above beside inside across past".split()
_ADVS = "quickly slowly carefully quietly happily loudly gently suddenly".split()
_TIMES = (
    "tomorrow",
    "tonight",
    "next week",
    "on Monday",
    "after lunch",
    "before dinner",
    "at noon",
)
_NUMS = "two three four five six seven eight nine ten twelve twenty".split()
_PLACES = "kitchen garden station market village tunnel forest castle".split()

# Every fourth noun, adjective and name is held out; held-out sentences use one as the subject.
_SPLIT_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {
        "noun": tuple(w for i, w in enumerate(_NOUNS) if i % 4 != 3),
        "adj": tuple(w for i, w in enumerate(_ADJS) if i % 4 != 3),
        "name": tuple(w for i, w in enumerate(_NAMES) if i % 4 != 3),
        "place": tuple(w for w in _PLACES if w not in _NOUNS[3::4]),
    },
    "heldout": {
        "noun": tuple(w for i, w in enumerate(_NOUNS) if i % 4 == 3),
        "adj": tuple(w for i, w in enumerate(_ADJS) if i % 4 == 3),
        "name": tuple(w for i, w in enumerate(_NAMES) if i % 4 == 3),
        "place": tuple(w for w in _PLACES if w in _NOUNS[3::4]),
    },
}

_TEMPLATES = (
    "The {adj} {subj} {past} the {noun} {prep} the {noun2}.",
    "{Name} {past} {num} {adj} {nouns} {prep} the {place}.",
    "Why did the {subj} {verb} the {noun} so {adv}?",
    "I think we should {verb} the {adj} {subj} {time}.",
    "Please {verb} the {subj} and {verb2} it {adv}.",
    "There are {num} {adj} {subjs} in the {place}.",
    "{Name} said that the {subj} was {adj} and {adj2}.",
    "Did you {verb} my {adj} {subj} {prep} the {noun}?",
    "The {subj} {past} {adv}, and then the {noun} {past2} it.",
    "My {adj} {subj} can {verb} {num} {nouns} {time}.",
)


def check_espeak() -> str:
    """Path of the espeak-ng binary; ``UserError`` with the install command when it is missing."""
    path = shutil.which(ESPEAK)
    if path is None:
        raise UserError("espeak-ng not found; install it with: apt-get install espeak-ng")
    return path


def _plural(noun: str) -> str:
    if noun.endswith(("s", "sh", "ch", "x")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith("f"):
        return noun[:-1] + "ves"
    return noun + "s"


def make_sentence(rng: np.random.Generator, split: str = "train") -> str:
    """One sentence from the word grammar; ``split`` picks the word pool (see module docstring)."""
    if split not in _SPLIT_WORDS:
        raise UserError(f"speech split must be 'train' or 'heldout', got {split!r}")
    own = _SPLIT_WORDS[split]
    # Non-subject slots: train may only use train words; held-out may use any word.
    pool = (
        _SPLIT_WORDS["train"]
        if split == "train"
        else {"noun": tuple(_NOUNS), "adj": tuple(_ADJS), "name": tuple(_NAMES)}
    )

    def pick(seq: tuple[str, ...] | list[str]) -> str:
        return str(seq[int(rng.integers(len(seq)))])

    verb, verb2 = _VERBS[int(rng.integers(len(_VERBS)))], _VERBS[int(rng.integers(len(_VERBS)))]
    subj = pick(own["noun"])
    # The name slot counts as the subject in templates that have no {subj}.
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    name = pick(own["name"]) if "{subj" not in template else pick(pool["name"])
    words = {
        "subj": subj,
        "subjs": _plural(subj),
        "noun": pick(pool["noun"]),
        "noun2": pick(pool["noun"]),
        "nouns": _plural(pick(pool["noun"])),
        "adj": pick(pool["adj"]) if "{subj" in template else pick(own["adj"]),
        "adj2": pick(pool["adj"]),
        "Name": name,
        "verb": verb[0],
        "verb2": verb2[0],
        "past": verb[1],
        "past2": verb2[1],
        "prep": pick(_PREPS),
        "adv": pick(_ADVS),
        "time": pick(_TIMES),
        "num": pick(_NUMS),
        "place": pick(own["place"] if split == "train" else _PLACES),
    }
    return template.format(**words)


def sentence_words(split: str) -> set[str]:
    """Nouns (singular and plural) and names of ``split``'s own pool: train sentences never
    contain a held-out one, and every held-out sentence contains one."""
    w = _SPLIT_WORDS[split]
    return set(w["noun"]) | {_plural(n) for n in w["noun"]} | set(w["name"])


def _run_espeak(ssml: str, voice: str, speed_wpm: int, pitch: int) -> np.ndarray:
    """Speak SSML text; returns float32 mono audio at ESPEAK_RATE_HZ."""
    exe = check_espeak()
    with tempfile.TemporaryDirectory(prefix="livehead_tts_") as tmp:
        wav = Path(tmp) / "speech.wav"
        cmd = [exe, "-m", "-v", voice, "-s", str(speed_wpm), "-p", str(pitch), "-w", str(wav)]
        proc = subprocess.run(cmd, input=ssml.encode(), capture_output=True, check=False)
        if proc.returncode != 0 or not wav.exists():
            msg = proc.stderr.decode(errors="replace").strip()
            raise UserError(f"espeak-ng failed (voice {voice}): {msg or 'no output'}")
        audio, rate = sf.read(str(wav), dtype="float32", always_2d=True)
    if rate != ESPEAK_RATE_HZ:
        raise UserError(f"espeak-ng wrote {rate} Hz audio, expected {ESPEAK_RATE_HZ} Hz")
    return audio[:, 0]


def resample(audio: np.ndarray, from_hz: int, to_hz: int) -> np.ndarray:
    """Polyphase resampling of a (N,) float32 signal; returns float32."""
    g = gcd(from_hz, to_hz)
    return resample_poly(audio, to_hz // g, from_hz // g).astype(np.float32)


def synth_speech(
    rng: np.random.Generator,
    seconds: float,
    split: str = "train",
    sample_rate: int = 16000,
) -> tuple[np.ndarray, str]:
    """Speak enough random sentences to fill about ``seconds`` of audio.

    Returns ``(audio, text)``: audio is (N,) float32 in [-1, 1] at ``sample_rate`` (mono), with a
    short leading silence and 0.2-1.5 s silent gaps between sentences; N is whatever espeak-ng
    produced (usually a little more than ``seconds``; the caller pads/trims to whole frames, so
    the last sentence may be cut). ``text`` is all the sentences, space separated.
    """
    if seconds <= 0:
        raise UserError(f"speech duration must be positive, got {seconds} s")
    check_espeak()
    voice = ACCENTS[int(rng.integers(len(ACCENTS)))] + VARIANTS[int(rng.integers(len(VARIANTS)))]
    speed = int(rng.integers(SPEED_WPM[0], SPEED_WPM[1] + 1))
    pitch = int(rng.integers(PITCH[0], PITCH[1] + 1))
    lead = float(rng.uniform(*LEAD_S))
    # Plan sentences by an estimate of their spoken length (~1.5 syllables per word at `speed`
    # words per minute) so the audio overshoots the target a little rather than falling short.
    sentences: list[str] = []
    gaps: list[float] = []
    planned = lead
    while planned < seconds + 0.5:
        s = make_sentence(rng, split)
        sentences.append(s)
        planned += len(s.split()) * 60.0 / speed * 1.1
        gap = float(rng.uniform(*GAP_S))
        gaps.append(gap)
        planned += gap
    parts = []
    for s, gap in zip(sentences, gaps):
        parts.append(s)
        parts.append(f'<break time="{int(gap * 1000)}ms"/>')
    ssml = "<speak>" + " ".join(parts) + "</speak>"
    audio = _run_espeak(ssml, voice, speed, pitch)
    audio = resample(audio, ESPEAK_RATE_HZ, sample_rate)
    # espeak-ng drops a leading <break>, so the leading silence is added here.
    audio = np.concatenate([np.zeros(int(lead * sample_rate), np.float32), audio])
    np.clip(audio, -1.0, 1.0, out=audio)
    return audio, " ".join(sentences)

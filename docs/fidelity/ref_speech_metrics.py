"""Reference WER/CER for tests/evaluation/test_speech_metrics.py: openai/whisper's normalisers + jiwer.

Run once (never in CI) with the project venv and the reference packages installed outside it:

    .venv/bin/pip install --no-deps --target /tmp/h17speech/pkgs openai-whisper==20250625 more-itertools
    PYTHONPATH=/tmp/h17speech/pkgs .venv/bin/python docs/fidelity/ref_speech_metrics.py

Reference: openai-whisper 20250625 (PyPI wheel; = openai/whisper@v20250625 whisper/normalizers/{english,basic}.py
and english.json), jiwer 4.0.0 (the project's pinned dependency). `whisper/__init__.py` pulls in the model, numba
and tiktoken, so only the `whisper.normalizers` subpackage is loaded, under a bare package shim. This is how
Whisper's own LibriSpeech notebook and the HF evaluation score: normalise both sides with EnglishTextNormalizer()
(which reads english.json itself) or BasicTextNormalizer() for other languages, then jiwer.wer / jiwer.cer over
the lists (corpus rates). It also checks that transformers' copy of the normaliser, fed the same english.json,
gives the same strings. Prints the per-case table and the corpus figures that the tests hold.
"""

import hashlib
import importlib
import json
import sys
import types
from pathlib import Path

import jiwer

spec = importlib.util.find_spec("more_itertools")
assert spec is not None, "more_itertools is needed by whisper.normalizers"
root = next(Path(p) for p in sys.path if (Path(p) / "whisper" / "normalizers" / "english.json").is_file())
shim = types.ModuleType("whisper")
shim.__path__ = [str(root / "whisper")]  # a namespace-like package: skips whisper/__init__.py
sys.modules["whisper"] = shim
from transformers.models.whisper.english_normalizer import EnglishTextNormalizer as HFEnglish  # noqa: E402
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer  # noqa: E402

SPELLING = root / "whisper" / "normalizers" / "english.json"

# (reference, hypothesis, language): spelling, numbers, currency, punctuation, contractions, titles, fillers,
# asides, diacritics, empty sides. Mirrored in tests/evaluation/test_speech_metrics.py:CASES.
CASES = [
    ("The colour of the centre was grey.", "the color of the center was gray", "en"),
    ("I've organised the programme.", "i have organized the program", "en"),
    ("Mr. Smith paid $20.", "mister smith paid twenty dollars", "en"),
    ("It costs $1,000,000.", "it costs one million dollars", "en"),
    ("She was born in 1985.", "she was born in nineteen eighty five", "en"),
    ("The 21st century", "the twenty first century", "en"),
    ("About 50% of them", "about fifty percent of them", "en"),
    ("He won't go, can't stay.", "he will not go can not stay", "en"),
    ("Let's say it's done.", "let us say it is done", "en"),
    ("Hello, world! How are you?", "hello world how are you", "en"),
    ("uh hello [noise] world (laughs)", "hello world", "en"),
    ("Dr. Jones lives on St. James St.", "doctor jones lives on saint james street", "en"),
    ("one oh one", "101", "en"),
    ("Café naïve résumé", "cafe naive resume", "en"),
    ("well-known e-mail", "well known email", "en"),
    ("", "", "en"),
    ("", "something extra here", "en"),
    ("(laughs)", "ha ha", "en"),
    ("the cat sat", "", "en"),
    ("hmm", "", "en"),
    ("Le chat est là!", "le chat est la", "fr"),
    ("Ça coûte 20 €.", "ca coute vingt euros", "fr"),
    ("Straße und Öl", "strasse und öl", "de"),
]

# A 20-utterance English set (read-speech style, with British spellings on the reference side) for the corpus
# figures: default Whisper normalisation vs the same normaliser without its spelling table.
CORPUS = [
    ("The colour of the centre was grey.", "the color of the center was gray"),
    ("We analysed the behaviour of the neighbours.", "we analyzed the behavior of the neighbors"),
    ("He travelled to the theatre on Monday.", "he traveled to the theater on monday"),
    ("Her favourite flavour is lemon.", "her favorite flavor is lemon"),
    ("The organisation apologised for the delay.", "the organization apologized for the delay"),
    ("I'll meet you at 5 o'clock.", "i will meet you at five oclock"),
    ("There were 3 dogs and 12 cats.", "there were three dogs and twelve cats"),
    ("The defence of the realm.", "the defense of the realm"),
    ("She paid £30 for the licence.", "she paid thirty pounds for the license"),
    ("It's a quarter past two.", "its a quarter past two"),
    ("They recognised the honour.", "they recognized the honor"),
    ("The programme starts at noon.", "the program starts at new"),
    ("Please catalogue these jewellery items.", "please catalog these jewelry items"),
    ("The tyres were worn.", "the tires were worn out"),
    ("He's gone to the grey building.", "he has gone to the gray building"),
    ("A litre of milk costs $2.50.", "a liter of milk cost two dollars fifty"),
    ("The harbour was full of boats.", "the harbor was full of boat"),
    ("We practised in the afternoon.", "we practiced in the afternoon"),
    ("Her moustache was fake.", "her mustache was fake"),
    ("Um, the plough is in the barn.", "the plow is in the barn"),
]


def main() -> None:
    mapping = json.loads(SPELLING.read_text())
    print(f"english.json: {len(mapping)} entries, sha256 {hashlib.sha256(SPELLING.read_bytes()).hexdigest()}")
    english, basic, hf = EnglishTextNormalizer(), BasicTextNormalizer(), HFEnglish(mapping)
    print("# per case: normalised ref | normalised hyp | wer | cer")
    for ref, hyp, lang in CASES:
        norm = english if lang == "en" else basic
        nr, nh = norm(ref).strip(), norm(hyp).strip()
        if lang == "en":
            assert (hf(ref).strip(), hf(hyp).strip()) == (nr, nh), (ref, hyp)
        w, c = jiwer.wer([nr], [nh]), jiwer.cer([nr], [nh])
        print(f"({ref!r}, {hyp!r}, {lang!r}, {nr!r}, {nh!r}, {float(w)!r}, {float(c)!r}),")
    en = [(r, h) for r, h, lang in CASES if lang == "en"]
    refs, hyps = [english(r).strip() for r, _ in en], [english(h).strip() for _, h in en]
    print("english cases, corpus wer/cer:", repr(jiwer.wer(refs, hyps)), repr(jiwer.cer(refs, hyps)))
    no_spelling = HFEnglish({})
    for name, norm in (("whisper default", english), ("no spelling table", no_spelling)):
        refs = [norm(r).strip() for r, _ in CORPUS]
        hyps = [norm(h).strip() for _, h in CORPUS]
        print(f"20-utterance corpus, {name}: wer", repr(jiwer.wer(refs, hyps)), "cer", repr(jiwer.cer(refs, hyps)))
    # jiwer's empty-reference rules, as numbers
    print("all-empty refs: wer", jiwer.wer(["", ""], ["a b", "c"]), "cer", jiwer.cer(["", ""], ["a b", "c"]))


if __name__ == "__main__":
    main()

